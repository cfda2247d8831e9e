"""The training engine: the trainer, its step loop, batching, checkpoints and resume, the run's data, the
teacher's fine-tune, trackers and the final report."""
