"""Starting a run: an experiment file's config loader, and opening the run directory.

from src.launch import load_experiment_config
"""

from src.launch.experiment import load_experiment_config

__all__ = ["load_experiment_config"]
