"""Starting a run: opening its run directory for training (the resume-settings guard, the
lock, the newest checkpoint here and in S3, the S3 mirror), before any training code runs.

``opening``: ``open_run(cfg, world_size)``, which reads the run's checkpoint sidecars and the
bucket's manifest once and hands the trainer what it found. ``resume_guard``: the check that
a resumed run keeps the settings its checkpoints were made with.
"""
