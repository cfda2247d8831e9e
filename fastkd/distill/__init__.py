"""fastkd in any training loop: ``Distiller`` (the loss module plus the frozen teacher) and ``hf``
(``DistillationTrainer``, the transformers Trainer)."""
