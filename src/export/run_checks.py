"""Is this a finished run nobody trains in? The run-directory checks of every export, each
failure one line that names the problem and the fix."""

from __future__ import annotations

from pathlib import Path

from src.checkpoints import read_checkpoint_infos
from src.export.errors import ExportError
from src.runs.layout import RunLayout
from src.runs.lock import RunInUseError, RunLock, acquire_run_lock

WEIGHTS = ("best", "final")  # RunLayout.weights() names


def newest_checkpoint(layout: RunLayout) -> Path | None:
    """The run's newest committed checkpoint (its sidecar written), or None."""
    records = read_checkpoint_infos(layout.checkpoints)
    return records[0].path if records else None


def check_run_dir(layout: RunLayout, weights: str) -> None:
    """``layout.root`` is a run directory and ``weights`` a choice there is; before the lock,
    so a mistyped path creates nothing."""
    if weights not in WEIGHTS:
        raise ExportError(f"--weights {weights!r}: choose best or final")
    if not layout.root.is_dir():
        raise ExportError(
            f"run directory {layout.root} does not exist: pass <paths.output_dir>/<run_name>, "
            "e.g. outputs/template-dev"
        )
    if not layout.config.is_file():
        raise ExportError(
            f"{layout.root} has no {layout.config.name}, so it is not a run directory: pass "
            f"<paths.output_dir>/<run_name>, the folder with {layout.config.name} and "
            f"{layout.best_model.name}"
        )


def lock_for_export(layout: RunLayout) -> RunLock:
    """The run's lock, held while exporting: a trainer started meanwhile (a resume) is
    refused instead of writing weights while they are being read."""
    try:
        return acquire_run_lock(layout.root)
    except RunInUseError as error:
        raise ExportError(
            f"run {layout.root} is still training ({error.holder}): wait for it to finish, "
            "then export"
        ) from None
    except OSError as error:  # a read-only copy, say: the export could not write there either
        raise ExportError(f"cannot lock run {layout.root} for the export: {error}") from None


def weights_to_export(layout: RunLayout, weights: str) -> Path:
    """The weights file of a finished run, or ExportError naming what is missing."""
    newest = newest_checkpoint(layout)
    any_weights = newest or layout.best_model.is_file() or layout.final_model.is_file()
    if not any_weights:
        raise ExportError(
            f"run {layout.root} has no weights (no {layout.best_model.name}, "
            f"{layout.final_model.name} or checkpoints): train it to the end first by running "
            "its experiment"
        )
    if not layout.is_finished:
        where = f", newest checkpoint {newest.name}" if newest else ""
        raise ExportError(
            f"run {layout.root} is unfinished (no {layout.final_model.name}{where}): re-run its "
            "experiment command to finish it (it resumes), then export"
        )
    path = layout.weights(weights)
    if not path.is_file():
        other = "final" if weights == "best" else "best"
        raise ExportError(f"run {layout.root} has no {path.name}: export --weights {other} instead")
    return path
