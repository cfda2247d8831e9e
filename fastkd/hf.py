"""``fastkd.hf``, the public path of the transformers integration: ``from fastkd.hf import DistillationTrainer``
(the code is fastkd.distill.hf)."""

from fastkd.distill.hf import DistillationTrainer, load_student_weights  # noqa: F401

__all__ = ["DistillationTrainer", "load_student_weights"]
