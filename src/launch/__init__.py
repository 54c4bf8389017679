"""Starting a run, before any training code runs.

``experiment``: ``load_experiment_config``, an experiment file's config from the command line
(or defaults in a notebook), checked against this machine. ``opening``: ``open_run(cfg,
world_size)``, which opens the run directory for training (the resume-settings guard, the
lock, the newest checkpoint here and in S3, the S3 mirror), reading the checkpoint sidecars
and the bucket's manifest once. ``resume_guard``: the check that a resumed run keeps the
settings its checkpoints were made with.

    from src.launch import load_experiment_config
"""

from src.launch.experiment import load_experiment_config

__all__ = ["load_experiment_config"]
