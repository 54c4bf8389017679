"""``export_run(run_dir, fmt)``: a finished run's weights -> the format's files, checked before
they are kept. What every format shares:

1. the run directory: config.json, not training now (its lock is taken, and held to the
   end), finished (final_model.pt or final_adapter/ written), the chosen weights present
   (``run_checks``);
2. the format's source: the model rebuilt with its ``ExportSpec`` (``specs``; the built-in
   ones: ``builtin_specs``), or a PEFT run's adapter directory (``AdapterRun``);
3. the format writes each target (a file or a directory) to a hidden temp path and checks
   it (``ExportFormat.write``);
4. every check passed: each target is renamed into place (``staging``), ``<target>.json``
   written beside it (a directory's lists every file in it with sha256 and size).

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

from src.common.atomic_io import sha256_file, temp_path_for
from src.export import builtin_specs  # noqa: F401  (registers the template and char LM specs)
from src.export.errors import ExportError, describe_error
from src.export.format import ADAPTER, AdapterRun, ExportFormat, Log
from src.export.registry import resolve_format
from src.export.run_checks import (
    ADAPTER_WEIGHTS,
    adapter_to_export,
    check_run_dir,
    lock_for_export,
    weights_to_export,
)
from src.export.sidecar import metadata_path_for
from src.export.specs import (
    ExportRun,
    ExportSpec,
    SpecBuilder,
    find_spec,
    load_spec_builder,
    registered_names,
)
from src.export.staging import commit, remove, remove_stale, tree_files
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


def export_run(
    run_dir: str | os.PathLike[str],
    fmt: str | ExportFormat,
    weights: str = "best",
    *,
    spec: str | SpecBuilder | None = None,
    log: Log = print,
) -> ExportResult:
    """Export ``run_dir``'s ``best_model.pt`` (or ``final_model.pt``; a PEFT run's
    ``best_adapter/`` or ``final_adapter/``) as ``fmt``: a format name with its default options
    (``"onnx"``, ``"hf"``) or a configured one (``OnnxFormat(int8=True)``,
    ``HfFormat(merge=True)``).

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
    config = json.loads(layout.config.read_text())
    started = time.perf_counter()
    if export_format.source == ADAPTER:
        source, run_meta, extra = _adapter_source(layout, config, weights, spec, export_format, log)
    else:
        source, run_meta, extra = _spec_source(layout, config, weights, spec, export_format, log)
    run_meta = {
        "run_name": config.get("run_name"),
        **run_meta,
        "config_sha256": config_sha256(config),
    }

    targets = export_format.targets(layout)
    for target in targets:
        remove_stale(target)  # what an export killed mid-way left (we hold the run lock)
    staged = {target: temp_path_for(target) for target in targets}
    try:
        written = export_format.write(source, staged, log)
        base = {
            "format": METADATA_FORMAT,
            "run": run_meta,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        # Every check passed: put the targets in place, each with its sidecar.
        files: dict[Path, dict[str, Any]] = {}
        for target, tmp in staged.items():
            meta = {**base, "file": target.name, **written[target]}
            if tmp.is_dir():
                listing = tree_files(tmp)
                meta.update(
                    kind="directory",
                    size_bytes=sum(entry["size_bytes"] for entry in listing.values()),
                    files=listing,
                )
                what = f"{len(listing)} files, {meta['size_bytes'] / 1e6:.2f} MB"
            else:
                meta.update(sha256=sha256_file(tmp), size_bytes=tmp.stat().st_size)
                what = f"sha256 {meta['sha256']}"
            commit(tmp, target)
            write_json(metadata_path_for(target), meta)
            log(f"wrote {target} (+ {metadata_path_for(target).name}), {what}")
            files[target] = meta
    finally:
        for tmp in staged.values():
            remove(tmp)
    log(f"done in {time.perf_counter() - started:.1f} s")
    return ExportResult(files)


def _spec_source(
    layout: RunLayout,
    config: dict[str, Any],
    weights: str,
    spec: str | SpecBuilder | None,
    export_format: ExportFormat,
    log: Log,
) -> tuple[ExportSpec, dict[str, Any], dict[str, Any]]:
    """The model rebuilt from best/final_model.pt by its spec; (spec, run metadata, the
    spec's own metadata)."""
    weights_path = weights_to_export(layout, weights, export_format.name)
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
    run_meta = {
        "weights": weights_path.name,
        "weights_sha256": sha256_file(weights_path),
        "spec": spec_name,
        "model_class": model_name,
    }
    return model_spec, run_meta, model_spec.metadata


def _adapter_source(
    layout: RunLayout,
    config: dict[str, Any],
    weights: str,
    spec: str | SpecBuilder | None,
    export_format: ExportFormat,
    log: Log,
) -> tuple[AdapterRun, dict[str, Any], dict[str, Any]]:
    """A PEFT run's best/final adapter directory; (source, run metadata, {})."""
    if spec is not None:
        raise ExportError(
            f"--spec does not apply to --format {export_format.name}: it loads the run's "
            "adapter onto the base its config names"
        )
    adapter = adapter_to_export(layout, weights)
    log(f"exporting {adapter.name}/ of {layout.root}")
    run_meta = {
        "weights": f"{adapter.name}/{ADAPTER_WEIGHTS}",
        "weights_sha256": sha256_file(adapter / ADAPTER_WEIGHTS),
    }
    return AdapterRun(layout.root, config, adapter, weights), run_meta, {}
