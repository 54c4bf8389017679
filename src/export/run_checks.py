"""Is this a finished run nobody trains in? The run-directory checks of every export, each
failure one line that names the problem and the fix."""

from __future__ import annotations

from pathlib import Path

from src.checkpoints import read_checkpoint_infos
from src.export.errors import ExportError
from src.runs.layout import RunLayout
from src.runs.lock import RunInUseError, RunLock, acquire_run_lock

WEIGHTS = ("best", "final")  # RunLayout.weights() names
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's save_pretrained layout
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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


def is_adapter_run(layout: RunLayout) -> bool:
    """A PEFT run: it wrote best_adapter/ or final_adapter/."""
    return layout.best_adapter.is_dir() or layout.final_adapter.is_dir()


def adapter_dir(layout: RunLayout, weights: str) -> Path:
    """``best_adapter/`` or ``final_adapter/``."""
    return {"best": layout.best_adapter, "final": layout.final_adapter}[weights]


def weights_to_export(layout: RunLayout, weights: str, format_name: str = "onnx") -> Path:
    """The weights file of a finished run, or ExportError naming what is missing."""
    if is_adapter_run(layout) and not (layout.best_model.is_file() or layout.final_model.is_file()):
        raise ExportError(
            f"run {layout.root} is a PEFT (LoRA) run: --format {format_name} exports "
            f"{layout.best_model.name}/{layout.final_model.name}, and its weights are adapters "
            f"({layout.final_adapter.name}/); use --format hf (add --merge for a full model)"
        )
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


def adapter_to_export(layout: RunLayout, weights: str) -> Path:
    """The adapter directory of a finished PEFT run, or ExportError naming what is missing."""
    chosen = adapter_dir(layout, weights)
    if not is_adapter_run(layout):
        plain = [p.name for p in (layout.final_model, layout.best_model) if p.is_file()]
        if plain:
            raise ExportError(
                f"run {layout.root} is not a PEFT (LoRA) run (it has {plain[0]}, no "
                f"{layout.final_adapter.name}/): --format hf exports LoRA adapters; export "
                "this run with --format onnx"
            )
        newest = newest_checkpoint(layout)
        if newest is None:
            raise ExportError(
                f"run {layout.root} has no adapters (no {layout.best_adapter.name}/, "
                f"{layout.final_adapter.name}/ or checkpoints): train it to the end first by "
                "running its experiment"
            )
    if not layout.final_adapter.is_dir():
        newest = newest_checkpoint(layout)
        where = f", newest checkpoint {newest.name}" if newest else ""
        raise ExportError(
            f"run {layout.root} is unfinished (no {layout.final_adapter.name}/{where}): re-run "
            "its experiment command to finish it (it resumes), then export"
        )
    if not chosen.is_dir():
        other = "final" if weights == "best" else "best"
        raise ExportError(
            f"run {layout.root} has no {chosen.name}/: export --weights {other} instead"
        )
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (chosen / name).is_file()]
    if missing:
        raise ExportError(
            f"{chosen} is not a PEFT adapter (no {', '.join(missing)}): it should hold what "
            "save_pretrained writes; re-run the experiment's last step or export --weights "
            f"{'final' if weights == 'best' else 'best'}"
        )
    return chosen
