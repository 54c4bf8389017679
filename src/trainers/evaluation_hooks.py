"""After-evaluation hooks: code outside the trainer sees each validation result and may ask
for a clean stop, which the run records as pruned.

A hyperparameter search (src/sweeps/optuna_trial.py) registers one before it runs an
experiment file, reports each value to its study and answers "prune". The trainer imports
no search library: it only calls the hooks registered here, on the main process, after
every evaluation, and stops like an early stop (checkpoint, final weights, test set) when
one of them returns True. ``run_interruptible`` calls them from a Hugging Face Trainer's
evaluations the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Evaluation:
    """One validation result as a hook sees it."""

    # Epochs completed, this one included: the step a search reports at. A Hugging Face
    # Trainer run (src/integrations/hf_trainer.py) gives its evaluations so far instead.
    epoch: int
    global_step: int
    monitor: str  # trainer.monitor, e.g. "val/loss"
    value: float  # its value at this evaluation
    epoch_done: bool  # False: an evaluation at max_steps in the middle of an epoch


EvaluationHook = Callable[[Evaluation], bool]  # True: stop the run now, recorded as pruned

_HOOKS: list[EvaluationHook] = []


def add_evaluation_hook(hook: EvaluationHook) -> None:
    _HOOKS.append(hook)


def remove_evaluation_hook(hook: EvaluationHook) -> None:
    if hook in _HOOKS:
        _HOOKS.remove(hook)


def run_evaluation_hooks(evaluation: Evaluation) -> bool:
    """Call every hook (each sees every evaluation); True when any asks to stop."""
    answers = [hook(evaluation) for hook in list(_HOOKS)]
    return any(answers)
