"""The kit's promises for training loops it does not own: ``run_interruptible`` gives a
Hugging Face ``Trainer`` (TRL's too) signal-safe stops, complete-checkpoint resume, the S3
mirror, the budget and GPU/cost logging."""
