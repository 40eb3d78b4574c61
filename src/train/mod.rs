//! Training: optimiser, schedules, runs (checkpoints, metrics, resume), the trainer.
