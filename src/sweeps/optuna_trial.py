"""Inside one trial's process: run an experiment file unchanged, reporting to its study.

    python -m src.sweeps.optuna_trial experiments/x.py [--config C] key=value ...

The Optuna worker (src/sweeps/optuna_study.py) starts this with the study's storage, name,
the trial's id and the pruner in the environment. An after-evaluation hook
(src/trainers/evaluation_hooks.py) reports ``trainer.monitor`` after every epoch as the
trial's intermediate value at that epoch and asks the pruner; when it says prune, the
trial records the epoch and the trainer stops cleanly, like an early stop (checkpoint,
final weights, test set, exit 0). The experiment file runs as ``__main__`` with its own
command line, so its exit code (75 on SIGTERM, 2 on a config error) is this process's.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import warnings

import optuna
from optuna.storages import RDBStorage

from src.sweeps.optuna_space import make_pruner
from src.sweeps.optuna_study import (
    PRUNED_ATTR,
    TRIAL_ID_ENV,
    TRIAL_PRUNER_ENV,
    TRIAL_STORAGE_ENV,
    TRIAL_STUDY_ENV,
    open_storage,
)
from src.trainers.evaluation_hooks import Evaluation, add_evaluation_hook


class StudyReporter:
    """The hook: report each full epoch's monitored value, then ask the pruner."""

    def __init__(self, study: optuna.Study, storage: RDBStorage, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.trial = optuna.trial.Trial(study, trial_id)

    def __call__(self, evaluation: Evaluation) -> bool:
        if not evaluation.epoch_done:  # a max_steps evaluation mid-epoch: not a new step
            return False
        with warnings.catch_warnings():  # a resumed epoch reported again: Optuna keeps the first
            warnings.simplefilter("ignore")
            self.trial.report(evaluation.value, evaluation.epoch)
        if not self.trial.should_prune():
            return False
        self.storage.set_trial_system_attr(self.trial_id, PRUNED_ATTR, evaluation.epoch)
        return True


def attach(environ: dict[str, str]) -> StudyReporter:
    """The reporter for the trial the environment names, registered with the trainer."""
    storage = open_storage(environ[TRIAL_STORAGE_ENV])
    pruner_settings = json.loads(environ[TRIAL_PRUNER_ENV])
    study = optuna.load_study(
        study_name=environ[TRIAL_STUDY_ENV],
        storage=storage,
        pruner=make_pruner(pruner_settings["name"], pruner_settings["args"]),
    )
    reporter = StudyReporter(study, storage, int(environ[TRIAL_ID_ENV]))
    add_evaluation_hook(reporter)
    return reporter


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m src.sweeps.optuna_trial EXPERIMENT [args...]")
    attach(dict(os.environ))
    sys.argv = list(argv)  # the experiment reads its own command line
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
