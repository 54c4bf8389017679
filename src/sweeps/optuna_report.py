"""What a user reads at the end of an Optuna sweep, written next to the study.

- a table of trials: number, state, parameters, value, epochs run, cost, run name;
- the best trial's parameters and the plain command that trains it again;
- parameter importances (Optuna's fANOVA, seeded);
- plots as PNG files: optimization history, parallel coordinates, importances.

Files in ``<output_dir>/sweeps/<name>/``: ``summary.json``, ``summary.csv`` and
``plots/*.png``. Plots and importances need finished trials that differ; when they cannot
be drawn yet, the report says why instead.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from src.common.atomic_io import atomic_write_bytes
from src.runs.files import write_json
from src.runs.layout import RunLayout
from src.sweeps.optuna_study import (
    SURPLUS_ATTR,
    StudySetup,
    first_number,
    redact,
    reproduce_command,
    trial_results,
    trial_run_name,
)
from src.sweeps.runner import format_table

PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")


@dataclass
class StudyReport:
    rows: list[dict[str, Any]]
    columns: list[str]
    best: dict[str, Any] | None  # number, value, params, command
    importances: dict[str, float]
    plots: list[Path]
    notes: list[str] = field(default_factory=list)  # what could not be computed, and why

    def text(self) -> str:
        lines = [format_table(self.rows, self.columns)]
        if self.best is not None:
            shown = ", ".join(f"{key}={value}" for key, value in self.best["params"].items())
            lines += [
                f"best: trial {self.best['number']}, value {self.best['value']:.6g}: {shown}",
                f"reproduce: {self.best['command']}",
            ]
        if self.importances:
            shown = ", ".join(f"{key} {value:.2f}" for key, value in self.importances.items())
            lines.append(f"importance (fANOVA): {shown}")
        lines += [f"plot: {path}" for path in self.plots]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _epochs_run(run_dir: Path, results: dict[str, Any]) -> int | None:
    if isinstance(results.get("epochs"), int):
        return results["epochs"]
    try:
        history = json.loads(RunLayout(run_dir).training_log.read_text())
    except (OSError, ValueError):
        return None
    return sum(1 for record in history if not record.get("partial_epoch"))


def trial_rows(setup: StudySetup) -> list[dict[str, Any]]:
    rows = []
    for trial in setup.study.get_trials(deepcopy=False):
        if trial.system_attrs.get(SURPLUS_ATTR):  # asked, never run: not part of the study
            continue
        run_name = trial_run_name(setup.spec, trial)
        run_dir = setup.paths.output_dir / run_name
        results = trial_results(run_dir)
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name.lower(),
                **trial.params,
                "value": trial.value,
                "epochs": _epochs_run(run_dir, results),
                "cost_usd": results.get("cost_usd"),
                "run_name": run_name,
                "retry_of": first_number(trial) if first_number(trial) != trial.number else None,
                "message": trial.user_attrs.get("message", ""),
            }
        )
    return rows


def _importances(study: optuna.Study, seed: int, notes: list[str]) -> dict[str, float]:
    # Imported here, like matplotlib in _plots: scikit-learn (fANOVA) takes about 2 s to
    # import, which every grid/random sweep and every trial process would pay for nothing.
    from optuna.importance import FanovaImportanceEvaluator

    try:
        evaluator = FanovaImportanceEvaluator(seed=seed)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        notes.append(f"no parameter importances yet: {error}")
        return {}
    return {key: round(float(value), 4) for key, value in importances.items()}


def _plots(study: optuna.Study, seed: int, plot_dir: Path, notes: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a rented GPU box
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as from_matplotlib
    from optuna.importance import FanovaImportanceEvaluator

    draw = {
        "optimization_history": lambda: from_matplotlib.plot_optimization_history(study),
        "parallel_coordinate": lambda: from_matplotlib.plot_parallel_coordinate(study),
        "param_importances": lambda: from_matplotlib.plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=seed)
        ),
    }
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning, empty-study warnings
                axes = draw[name]()
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            notes.append(f"no {name} plot: {error}")
            continue
        figure = getattr(axes, "figure", None) or axes.flat[0].figure  # one Axes or an array
        path = plot_dir / f"{name}.png"
        figure.savefig(path, bbox_inches="tight", dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def write_report(setup: StudySetup) -> StudyReport:
    """Build the report from the study and write summary.json, summary.csv and the plots."""
    spec, study = setup.spec, setup.study
    rows = trial_rows(setup)
    columns = ["number", "state", *spec.parameters, "value", "epochs", "cost_usd", "run_name"]
    if any(row["retry_of"] is not None for row in rows):
        columns.append("retry_of")
    notes: list[str] = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        trial = study.best_trial
        command = reproduce_command(spec, trial, setup.paths)
        best = {"number": trial.number, "value": trial.value, "params": trial.params}
        best["command"] = command
    importances = _importances(study, spec.seed, notes) if len(complete) > 1 else {}
    if len(complete) <= 1:
        notes.append("importances and plots need at least two complete trials")
        plots: list[Path] = []
    else:
        plots = _plots(study, spec.seed, setup.paths.summary_dir / "plots", notes)
    report = StudyReport(rows, columns, best, importances, plots, notes)
    spec_dict = {key: getattr(spec, key) for key in type(spec).__dataclass_fields__}
    spec_dict["storage"] = redact(setup.url)
    write_json(
        setup.paths.summary_dir / "summary.json",
        {
            "sweep": spec_dict,
            "monitor": setup.monitor,
            "direction": setup.direction,
            "trials": rows,
            "best": best,
            "importances": importances,
            "plots": [str(path) for path in plots],
            "notes": notes,
        },
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, "message"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(setup.paths.summary_dir / "summary.csv", buffer.getvalue().encode())
    return report
