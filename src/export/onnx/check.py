"""onnxruntime against torch on the same random inputs, every batch size x sequence length;
the file is refused when the largest error, relative to the largest output, is too big."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from src.export.errors import CheckFailedError

if TYPE_CHECKING:
    from src.export.specs import ExportSpec


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


def session(path: Path) -> Any:
    """An onnxruntime CPU session (the check runs where the model was trained)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def predictor(path: Path) -> Callable[[dict[str, Any]], list[Any]]:
    """``ExportSpec.evaluate``'s ``predict`` for the ONNX file at ``path``."""
    loaded = session(path)
    return lambda feeds: loaded.run(None, feeds)


def check_against_torch(
    spec: ExportSpec, path: Path, tolerance: float, seed: int = 0
) -> CheckReport:
    """Run both on the same random inputs, every batch size x sequence length."""
    import torch

    loaded = session(path)
    generator = torch.Generator().manual_seed(seed)
    report = CheckReport(tolerance)
    for batch in spec.batch_sizes:
        for seq_len in spec.seq_lengths or (None,):
            inputs = spec.make_inputs(batch, seq_len, generator)
            with torch.no_grad():
                expected = spec.model(*inputs)
            expected = expected if isinstance(expected, (tuple, list)) else (expected,)
            feeds = {name: x.numpy() for name, x in zip(spec.input_names, inputs, strict=True)}
            got = loaded.run(None, feeds)
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


def require_within(report: CheckReport, what: str, option: str) -> None:
    """CheckFailedError naming the worst input shape when ``report`` is above its tolerance."""
    if report.max_rel_error > report.tolerance:
        worst = report.worst
        raise CheckFailedError(
            f"{what} disagrees with torch: max rel error {worst['max_rel_error']:.2e} > "
            f"tolerance {report.tolerance:g} at {_shape_text(worst)} (max abs error "
            f"{worst['max_abs_error']:.2e}); nothing written: try --exporter torchscript, "
            f"or raise {option} if that difference is acceptable"
        )
