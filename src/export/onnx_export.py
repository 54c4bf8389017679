"""A finished run's weights -> ``model.onnx``, checked against torch before it is kept.

``export_run(run_dir)`` (what ``scripts/export_onnx.py`` calls):

1. checks the run directory without importing torch: config.json, finished (final_model.pt
   written), not training right now (its lock is free), the chosen weights present;
2. rebuilds the model with its ``ExportSpec`` (``src/export/specs.py``) and exports it with
   ``torch.onnx.export``: the dynamo exporter (``torch.export``) first, the classic
   TorchScript one when dynamo can't take the model; which one is printed and recorded;
3. runs onnxruntime and torch on the same random inputs at several batch sizes (and
   sequence lengths) and refuses the file when the largest error, relative to the largest
   output, is above the tolerance;
4. with ``int8=True``: dynamic int8 quantization (``onnxruntime.quantization``), the same
   check with a looser tolerance, and both models' loss/accuracy on the run's test split;
5. renames the checked file(s) into place and writes ``model.onnx.json`` beside each.

Everything is written to hidden temp files first: a failure at any step leaves the run
directory as it was (an older model.onnx included).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from src.common.atomic_io import fsync_dir, sha256_file, temp_path_for
from src.config import EXIT_CONFIG_ERROR, ConfigError
from src.export.inference import ONNX_TO_NUMPY, metadata_path_for
from src.runs.files import write_json

if TYPE_CHECKING:
    from src.export.specs import ExportSpec, SpecBuilder

WEIGHT_FILES = {"best": "best_model.pt", "final": "final_model.pt"}
EXPORTERS = ("auto", "dynamo", "torchscript")
FP32_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|: float reordering stays near 1e-6
# Dynamic int8 quantizes weights per tensor and activations per call: about 1% of the largest
# logit is normal. The test-split metrics say whether it matters for the task.
INT8_TOLERANCE = 0.05
METADATA_FORMAT = 1
INT8_PRECISION = "int8 (onnxruntime dynamic quantization: QInt8 weights, reduce_range)"
EXIT_CHECK_FAILED = 1  # the export ran but disagrees with torch: not the user's input


class ExportError(ConfigError):
    """A problem with what was asked for, as one line; the script exits with ``exit_code``."""

    label = "error"
    exit_code = EXIT_CONFIG_ERROR


class CheckFailedError(ExportError):
    exit_code = EXIT_CHECK_FAILED


@dataclass
class CheckReport:
    """onnxruntime against torch on the same inputs, one entry per (batch, length)."""

    tolerance: float
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max(case["max_abs_error"] for case in self.cases)

    @property
    def max_rel_error(self) -> float:
        return max(case["max_rel_error"] for case in self.cases)

    @property
    def worst(self) -> dict[str, Any]:
        return max(self.cases, key=lambda case: case["max_rel_error"])

    def summary(self) -> str:
        return (
            f"max abs error {self.max_abs_error:.2e}, max rel error {self.max_rel_error:.2e} "
            f"(tolerance {self.tolerance:g}) over {len(self.cases)} input shapes"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "relative_to": "the largest |torch output| of each input shape",
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "cases": self.cases,
        }


@dataclass
class ExportResult:
    onnx_path: Path
    metadata: dict[str, Any]
    int8_path: Path | None = None
    int8_metadata: dict[str, Any] | None = None


# ----- step 1: the run directory, checked without torch ------------------------------------


def _holder_of_lock(run_dir: Path) -> str | None:
    """Who trains in ``run_dir`` right now (the trainer's flock), or None. Never creates the
    lock file: a run directory copied home has none, and that is fine."""
    lock_path = run_dir / ".run.lock"
    if not lock_path.is_file():
        return None
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"PID {info['pid']} on {info['host']}"
        except (ValueError, KeyError, OSError):
            return "another process"
    finally:
        os.close(fd)  # drops our shared lock too
    return None


def check_run_dir(run_dir: str | os.PathLike[str], weights: str = "best") -> Path:
    """The weights file to export, or ExportError naming what is wrong and the fix."""
    run_dir = Path(run_dir)
    if weights not in WEIGHT_FILES:
        raise ExportError(f"--weights {weights!r}: choose best or final")
    if not run_dir.is_dir():
        raise ExportError(
            f"run directory {run_dir} does not exist: pass <paths.output_dir>/<run_name>, "
            "e.g. outputs/template-dev"
        )
    if not (run_dir / "config.json").is_file():
        raise ExportError(
            f"{run_dir} has no config.json, so it is not a run directory: pass "
            "<paths.output_dir>/<run_name>, the folder with config.json and best_model.pt"
        )
    holder = _holder_of_lock(run_dir)
    if holder is not None:
        raise ExportError(
            f"run {run_dir} is still training ({holder}): wait for it to finish, then export"
        )
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    any_weights = checkpoints or any((run_dir / name).is_file() for name in WEIGHT_FILES.values())
    if not any_weights:
        raise ExportError(
            f"run {run_dir} has no weights (no best_model.pt, final_model.pt or checkpoints): "
            "train it to the end first by running its experiment"
        )
    if not (run_dir / WEIGHT_FILES["final"]).is_file():
        where = f", newest checkpoint {checkpoints[-1].name}" if checkpoints else ""
        raise ExportError(
            f"run {run_dir} is unfinished (no final_model.pt{where}): re-run its experiment "
            "command to finish it (it resumes), then export"
        )
    path = run_dir / WEIGHT_FILES[weights]
    if not path.is_file():
        other = "final" if weights == "best" else "best"
        raise ExportError(f"run {run_dir} has no {path.name}: export --weights {other} instead")
    return path


def config_sha256(config: dict[str, Any]) -> str:
    """Hash of the resolved config, independent of key order and JSON formatting."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ----- step 2: torch.onnx.export, dynamo first ----------------------------------------------


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' chatter (warnings, log lines, graph dumps that TorchScript's
    C++ side prints straight to fd 1): the user sees our lines, and one error line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir", "")]
    levels = [logger.level for logger in loggers]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def describe_export_error(error: BaseException) -> str:
    """The innermost cause's first line, without colour codes (dynamo wraps the missing op's
    name two levels deep under a generic 'Failed to convert')."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first.rstrip(".")


def export_spec(
    spec: ExportSpec, path: Path, exporter: str = "auto", opset: int | None = None
) -> tuple[str, str | None]:
    """Write ``spec.model`` as ONNX to ``path``; (exporter used, why dynamo was not used).

    ``exporter``: ``auto`` tries dynamo then TorchScript; ``dynamo``/``torchscript`` only
    that one. ExportError (one line) when none could convert the model.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    spec.model.eval()
    common = dict(
        input_names=spec.input_names,
        output_names=spec.output_names,
        opset_version=opset,
        dynamic_axes=spec.axes(),
    )
    failures: list[str] = []
    if exporter in ("auto", "dynamo"):
        try:
            with quiet_exporters(), torch.no_grad():
                program = torch.onnx.export(
                    spec.model,
                    spec.example_inputs,
                    None,
                    dynamo=True,
                    external_data=False,  # one self-contained file (fine below 2 GB)
                    verbose=False,
                    **common,
                )
                program.save(str(path))
            return "dynamo", None
        except Exception as error:  # any failure: the classic exporter may still manage
            failures.append(f"dynamo exporter: {describe_export_error(error)}")
            path.unlink(missing_ok=True)
    if exporter in ("auto", "torchscript"):
        try:
            with quiet_exporters(), torch.no_grad():
                torch.onnx.export(
                    spec.model, spec.example_inputs, str(path), dynamo=False, **common
                )
            return "torchscript", failures[0] if failures else None
        except Exception as error:
            failures.append(f"TorchScript exporter: {describe_export_error(error)}")
            path.unlink(missing_ok=True)
    other = {"dynamo": " or try --exporter torchscript", "torchscript": " or try --exporter dynamo"}
    raise ExportError(
        f"cannot export {type(spec.model).__name__} to ONNX ({'; '.join(failures)}): "
        f"rewrite that op in forward() with ops ONNX has{other.get(exporter, '')}"
    )


# ----- step 3: onnxruntime against torch ---------------------------------------------------


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_against_torch(
    spec: ExportSpec, path: Path, tolerance: float, seed: int = 0
) -> CheckReport:
    """Run both on the same random inputs, every batch size x sequence length."""
    import numpy as np
    import torch

    session = _session(path)
    generator = torch.Generator().manual_seed(seed)
    report = CheckReport(tolerance)
    for batch in spec.batch_sizes:
        for seq_len in spec.seq_lengths or (None,):
            inputs = spec.make_inputs(batch, seq_len, generator)
            with torch.no_grad():
                expected = spec.model(*inputs)
            expected = expected if isinstance(expected, (tuple, list)) else (expected,)
            feeds = {name: x.numpy() for name, x in zip(spec.input_names, inputs, strict=True)}
            got = session.run(None, feeds)
            if len(got) != len(expected):
                raise CheckFailedError(
                    f"the ONNX model has {len(got)} outputs, torch returns {len(expected)}: "
                    "check the spec's output_names"
                )
            abs_error, scale = 0.0, 0.0
            for ours, theirs in zip(got, expected, strict=True):
                reference = theirs.detach().float().numpy()
                if ours.shape != reference.shape:
                    raise CheckFailedError(
                        f"ONNX output shape {list(ours.shape)} != torch {list(reference.shape)} "
                        f"at batch {batch}: the export fixed an axis that should be dynamic; "
                        "check the spec's dynamic_axes"
                    )
                abs_error = max(abs_error, float(np.abs(ours - reference).max()))
                scale = max(scale, float(np.abs(reference).max()))
            case: dict[str, Any] = {"batch": batch}
            if seq_len is not None:
                case["seq_len"] = seq_len
            case["max_abs_error"] = abs_error
            case["max_rel_error"] = abs_error / max(scale, 1e-12)
            report.cases.append(case)
    return report


def _shape_text(case: dict[str, Any]) -> str:
    return f"batch {case['batch']}" + (f", length {case['seq_len']}" if "seq_len" in case else "")


def _require_within(report: CheckReport, what: str, option: str) -> None:
    if report.max_rel_error > report.tolerance:
        worst = report.worst
        raise CheckFailedError(
            f"{what} disagrees with torch: max rel error {worst['max_rel_error']:.2e} > "
            f"tolerance {report.tolerance:g} at {_shape_text(worst)} (max abs error "
            f"{worst['max_abs_error']:.2e}); nothing written: try --exporter torchscript, "
            f"or raise {option} if that difference is acceptable"
        )


# ----- step 4: int8 -----------------------------------------------------------------------


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic quantization: int8 weights, activations quantized per call (no calibration
    data needed); MatMul/Gather-heavy models (MLPs, transformers) gain the most.

    ``reduce_range``: 7-bit weights. On x86 CPUs without VNNI the u8 x s8 kernels saturate
    with full-range weights; measured on the template MLP, 10-16% of the largest logit off
    without it, about 1% with it. Arm (an M1 laptop) loses next to nothing by it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_exporters():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, reduce_range=True)


def _predictor(path: Path) -> Callable[[dict[str, Any]], list[Any]]:
    session = _session(path)
    return lambda feeds: session.run(None, feeds)


# ----- step 5: metadata and the atomic rename ----------------------------------------------


def tool_versions(exporter: str) -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if exporter == "dynamo":
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    return versions


def describe_graph(path: Path) -> dict[str, Any]:
    """Inputs/outputs (name, dtype, shape with named dynamic axes) and the opset."""
    import numpy as np
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    session = _session(path)

    def nodes(items: list[Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": node.name,
                "dtype": np.dtype(ONNX_TO_NUMPY[node.type]).name
                if node.type in ONNX_TO_NUMPY
                else node.type,
                "shape": list(node.shape),
            }
            for node in items
        ]

    opset = next(item.version for item in proto.opset_import if item.domain in ("", "ai.onnx"))
    return {
        "opset": opset,
        "inputs": nodes(session.get_inputs()),
        "outputs": nodes(session.get_outputs()),
    }


def _commit(tmp: Path, target: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


# ----- the whole thing --------------------------------------------------------------------


def export_run(
    run_dir: str | os.PathLike[str],
    weights: str = "best",
    int8: bool = False,
    *,
    spec: str | SpecBuilder | None = None,
    exporter: str = "auto",
    tolerance: float = FP32_TOLERANCE,
    int8_tolerance: float = INT8_TOLERANCE,
    opset: int | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export ``run_dir``'s ``best_model.pt`` (or ``final_model.pt``) to ``model.onnx``.

    ``spec``: a builder (or ``"module:function"``) for a model the built-in specs don't
    know; default: the registered spec whose ``matches`` accepts the run's config.
    Raises ExportError (one line, with ``exit_code``) for bad input and failed checks.
    """
    run_dir = Path(run_dir)
    weights_path = check_run_dir(run_dir, weights)
    config = json.loads((run_dir / "config.json").read_text())
    started = time.perf_counter()

    import torch

    from src.export import specs

    if isinstance(spec, str):
        try:
            builder, spec_name = specs.load_spec_builder(spec), spec
        except ValueError as error:
            raise ExportError(str(error)) from None
    elif spec is not None:
        builder, spec_name = spec, f"{spec.__module__}:{spec.__qualname__}"
    else:
        entry = specs.find_spec(config)
        if entry is None:
            raise ExportError(
                f"no export spec knows the model of {run_dir} (built in: "
                f"{', '.join(specs.registered_names())}): write one for your model and pass "
                "--spec your.module:function (see README, 'Export to ONNX')"
            )
        builder, spec_name = entry.build, entry.name
    try:
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        model_spec = builder(specs.ExportRun(run_dir, config, state_dict, weights))
    except Exception as error:
        raise ExportError(
            f"cannot rebuild the model from {weights_path.name} with spec {spec_name}: "
            f"{type(error).__name__}: {describe_export_error(error)}"
        ) from None
    model_name = type(model_spec.model).__name__
    log(f"exporting {weights_path.name} of {run_dir} ({model_name}, spec {spec_name})")

    onnx_path = run_dir / "model.onnx"
    int8_path = run_dir / "model.int8.onnx"
    tmp_fp32, tmp_int8 = temp_path_for(onnx_path), temp_path_for(int8_path)
    try:
        used, dynamo_failure = export_spec(model_spec, tmp_fp32, exporter, opset)
        if used == "dynamo":
            log("exporter: dynamo (torch.export)")
        elif dynamo_failure:
            log(f"exporter: torchscript (classic); dynamo could not: {dynamo_failure}")
        else:
            log("exporter: torchscript (classic), as asked")
        report = check_against_torch(model_spec, tmp_fp32, tolerance)
        log(f"fp32 vs torch: {report.summary()}")
        _require_within(report, "the exported model", "--tolerance")
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
            "exporter": used,
            "exporter_note": dynamo_failure,
            "tools": tool_versions(used),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **model_spec.metadata,
        }
        metadata = {
            **base,
            "file": onnx_path.name,
            "precision": "fp32",
            **describe_graph(tmp_fp32),
            "check": report.as_json(),
        }
        int8_metadata = None
        if int8:
            quantize_int8(tmp_fp32, tmp_int8)
            int8_report = check_against_torch(model_spec, tmp_int8, int8_tolerance)
            log(f"int8 vs torch: {int8_report.summary()}")
            _require_within(int8_report, "the int8 model", "--int8-tolerance")
            sizes = {"fp32": tmp_fp32.stat().st_size, "int8": tmp_int8.stat().st_size}
            log(
                f"size: fp32 {sizes['fp32'] / 1e3:.1f} kB, int8 {sizes['int8'] / 1e3:.1f} kB "
                f"({sizes['int8'] / sizes['fp32']:.2f}x)"
            )
            int8_metadata = {
                **base,
                "file": int8_path.name,
                "precision": INT8_PRECISION,
                **describe_graph(tmp_int8),
                "check": int8_report.as_json(),
                "size_bytes_fp32": sizes["fp32"],
            }
            if model_spec.evaluate is None:
                log("test split: not evaluated (the spec cannot rebuild the run's data)")
            else:
                test = {
                    "fp32": model_spec.evaluate(_predictor(tmp_fp32)),
                    "int8": model_spec.evaluate(_predictor(tmp_int8)),
                }
                test["change"] = {
                    name: test["int8"][name] - value for name, value in test["fp32"].items()
                }
                log(
                    f"test split: fp32 {_format_metrics(test['fp32'])} | int8 "
                    f"{_format_metrics(test['int8'])} | change "
                    + " ".join(f"{k} {v:+.4f}" for k, v in test["change"].items())
                )
                metadata["test_split"] = test
                int8_metadata["test_split"] = test
        # Every check passed: put the files in place, each with its sidecar.
        outputs = [(tmp_fp32, onnx_path, metadata)]
        if int8_metadata is not None:
            outputs.append((tmp_int8, int8_path, int8_metadata))
        for tmp, target, meta in outputs:
            meta.update(sha256=sha256_file(tmp), size_bytes=tmp.stat().st_size)
            _commit(tmp, target)
            write_json(metadata_path_for(target), meta)
            log(f"wrote {target} (+ {metadata_path_for(target).name}), sha256 {meta['sha256']}")
    finally:
        tmp_fp32.unlink(missing_ok=True)
        tmp_int8.unlink(missing_ok=True)
    log(f"done in {time.perf_counter() - started:.1f} s")
    return ExportResult(onnx_path, metadata, int8_path if int8 else None, int8_metadata)
