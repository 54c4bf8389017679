"""``torch.onnx.export``: the dynamo exporter (``torch.export``) first, the classic TorchScript
one when dynamo can't take the model; either way one line when neither can."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from src.export.errors import ExportError, describe_error

if TYPE_CHECKING:
    from src.export.specs import ExportSpec

EXPORTERS = ("auto", "dynamo", "torchscript")


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
            failures.append(f"dynamo exporter: {describe_error(error)}")
            path.unlink(missing_ok=True)
    if exporter in ("auto", "torchscript"):
        try:
            with quiet_exporters(), torch.no_grad():
                torch.onnx.export(
                    spec.model, spec.example_inputs, str(path), dynamo=False, **common
                )
            return "torchscript", failures[0] if failures else None
        except Exception as error:
            failures.append(f"TorchScript exporter: {describe_error(error)}")
            path.unlink(missing_ok=True)
    other = {"dynamo": " or try --exporter torchscript", "torchscript": " or try --exporter dynamo"}
    raise ExportError(
        f"cannot export {type(spec.model).__name__} to ONNX ({'; '.join(failures)}): "
        f"rewrite that op in forward() with ops ONNX has{other.get(exporter, '')}"
    )
