"""Dynamic int8 quantization, and what it costs on the run's test split."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from src.export.format import Log
from src.export.onnx.check import predictor
from src.export.onnx.exporters import quiet_exporters

if TYPE_CHECKING:
    from src.export.specs import ExportSpec

INT8_PRECISION = "int8 (onnxruntime dynamic quantization: QInt8 weights, reduce_range)"


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


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def compare_on_test_split(
    spec: ExportSpec, fp32: Path, int8: Path, log: Log
) -> dict[str, Any] | None:
    """Both models' metrics on the test split and the change; None when the spec cannot
    rebuild the run's data."""
    if spec.evaluate is None:
        log("test split: not evaluated (the spec cannot rebuild the run's data)")
        return None
    test = {"fp32": spec.evaluate(predictor(fp32)), "int8": spec.evaluate(predictor(int8))}
    test["change"] = {name: test["int8"][name] - value for name, value in test["fp32"].items()}
    log(
        f"test split: fp32 {_format_metrics(test['fp32'])} | int8 "
        f"{_format_metrics(test['int8'])} | change "
        + " ".join(f"{k} {v:+.4f}" for k, v in test["change"].items())
    )
    return test
