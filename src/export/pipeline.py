"""``export_run(run_dir, fmt)``: a finished run's weights -> the format's files, checked before
they are kept. What every format shares:

1. the run directory: config.json, not training now (its lock is taken, and held to the
   end), finished (final_model.pt written), the chosen weights present (``run_checks``);
2. the model rebuilt with its ``ExportSpec`` (``specs``; the built-in ones: ``builtin_specs``);
3. the format writes each file to a hidden temp path and checks it (``ExportFormat.write``);
4. every check passed: each file is renamed into place, ``<file>.json`` written beside it.

A failure at any step leaves the run directory as it was (an older export included).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from src.common.atomic_io import fsync_dir, sha256_file, temp_path_for
from src.export import builtin_specs  # noqa: F401  (registers the template and char LM specs)
from src.export.errors import ExportError, describe_error
from src.export.format import ExportFormat, Log
from src.export.registry import resolve_format
from src.export.run_checks import check_run_dir, lock_for_export, weights_to_export
from src.export.sidecar import metadata_path_for
from src.export.specs import (
    ExportRun,
    SpecBuilder,
    find_spec,
    load_spec_builder,
    registered_names,
)
from src.runs.files import write_json
from src.runs.layout import RunLayout

METADATA_FORMAT = 1  # the sidecar's layout version


@dataclass
class ExportResult:
    """Each written file with its sidecar's content, the format's main file first."""

    files: dict[Path, dict[str, Any]]

    @property
    def path(self) -> Path:
        return next(iter(self.files))

    @property
    def metadata(self) -> dict[str, Any]:
        return self.files[self.path]


def config_sha256(config: dict[str, Any]) -> str:
    """Hash of the resolved config, independent of key order and JSON formatting."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def choose_spec(
    spec: str | SpecBuilder | None, config: dict[str, Any], run_dir: Path
) -> tuple[SpecBuilder, str]:
    """(builder, its name): the one given, by ``"module:function"`` or as a function, or the
    registered spec whose ``matches`` accepts the run's config."""
    if isinstance(spec, str):
        try:
            return load_spec_builder(spec), spec
        except ValueError as error:
            raise ExportError(str(error)) from None
    if spec is not None:
        return spec, f"{spec.__module__}:{spec.__qualname__}"
    entry = find_spec(config)
    if entry is None:
        raise ExportError(
            f"no export spec knows the model of {run_dir} (built in: "
            f"{', '.join(registered_names())}): write one for your model and pass "
            "--spec your.module:function (see README, 'Export to ONNX')"
        )
    return entry.build, entry.name


def commit(tmp: Path, target: Path) -> None:
    """Rename a checked temp file into place, durably."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def export_run(
    run_dir: str | os.PathLike[str],
    fmt: str | ExportFormat,
    weights: str = "best",
    *,
    spec: str | SpecBuilder | None = None,
    log: Log = print,
) -> ExportResult:
    """Export ``run_dir``'s ``best_model.pt`` (or ``final_model.pt``) as ``fmt``: a format
    name with its default options (``"onnx"``) or a configured one (``OnnxFormat(int8=True)``).

    ``spec``: a builder (or ``"module:function"``) for a model the built-in specs don't
    know; default: the registered spec whose ``matches`` accepts the run's config.
    Raises ExportError (one line, with ``exit_code``) for bad input and failed checks.
    """
    export_format = resolve_format(fmt)
    layout = RunLayout(Path(run_dir))
    check_run_dir(layout, weights)
    lock = lock_for_export(layout)
    try:
        return _export_locked(layout, export_format, weights, spec, log)
    finally:
        lock.release()


def _export_locked(
    layout: RunLayout,
    export_format: ExportFormat,
    weights: str,
    spec: str | SpecBuilder | None,
    log: Log,
) -> ExportResult:
    weights_path = weights_to_export(layout, weights)
    config = json.loads(layout.config.read_text())
    started = time.perf_counter()
    builder, spec_name = choose_spec(spec, config, layout.root)
    try:
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        model_spec = builder(ExportRun(layout.root, config, state_dict, weights))
    except Exception as error:  # the user's builder among them: any failure is one line
        raise ExportError(
            f"cannot rebuild the model from {weights_path.name} with spec {spec_name}: "
            f"{type(error).__name__}: {describe_error(error)}"
        ) from None
    model_name = type(model_spec.model).__name__
    log(f"exporting {weights_path.name} of {layout.root} ({model_name}, spec {spec_name})")

    staged = {target: temp_path_for(target) for target in export_format.targets(layout)}
    try:
        written = export_format.write(model_spec, staged, log)
        base = {
            "format": METADATA_FORMAT,
            "run": {
                "run_name": config.get("run_name"),
                "weights": weights_path.name,
                "weights_sha256": sha256_file(weights_path),
                "config_sha256": config_sha256(config),
                "spec": spec_name,
                "model_class": model_name,
            },
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **model_spec.metadata,
        }
        # Every check passed: put the files in place, each with its sidecar.
        files: dict[Path, dict[str, Any]] = {}
        for target, tmp in staged.items():
            meta = {**base, "file": target.name, **written[target]}
            meta.update(sha256=sha256_file(tmp), size_bytes=tmp.stat().st_size)
            commit(tmp, target)
            write_json(metadata_path_for(target), meta)
            log(f"wrote {target} (+ {metadata_path_for(target).name}), sha256 {meta['sha256']}")
            files[target] = meta
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    log(f"done in {time.perf_counter() - started:.1f} s")
    return ExportResult(files)
