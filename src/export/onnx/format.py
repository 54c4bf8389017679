"""``OnnxFormat``: a run's model as ``model.onnx`` (and ``model.int8.onnx``), each checked
against torch with onnxruntime before the pipeline keeps it.

1. ``torch.onnx.export``: dynamo first, TorchScript when dynamo can't take the model; which
   one is printed and recorded (``exporters``);
2. onnxruntime and torch on the same random inputs at several batch sizes (and sequence
   lengths): refused above the tolerance, relative to the largest output (``check``);
3. with ``int8``: dynamic int8 quantization, the same check with a looser tolerance, and both
   models' loss/accuracy on the run's test split (``int8``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from src.export.format import WEIGHTS, Log
from src.export.onnx.check import check_against_torch, require_within
from src.export.onnx.exporters import EXPORTERS, export_spec
from src.export.onnx.graph import describe_graph, tool_versions
from src.export.onnx.int8 import INT8_PRECISION, compare_on_test_split, quantize_int8
from src.runs.layout import RunLayout

if TYPE_CHECKING:
    from src.export.specs import ExportSpec

FP32_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|: float reordering stays near 1e-6
# Dynamic int8 quantizes weights per tensor and activations per call: about 1% of the largest
# logit is normal. The test-split metrics say whether it matters for the task.
INT8_TOLERANCE = 0.05
INT8_MODEL = "model.int8.onnx"  # beside RunLayout's model.onnx


@dataclass(frozen=True)
class OnnxFormat:
    """The ONNX export and its options (the ``scripts/export_onnx.py`` flags)."""

    name: ClassVar[str] = "onnx"
    source: ClassVar[str] = WEIGHTS  # best_model.pt / final_model.pt, rebuilt by a spec
    int8: bool = False  # also model.int8.onnx
    exporter: str = "auto"  # auto | dynamo | torchscript
    tolerance: float = FP32_TOLERANCE
    int8_tolerance: float = INT8_TOLERANCE
    opset: int | None = None  # None: the exporter's default

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx")
        parser.add_argument("--exporter", choices=EXPORTERS, default="auto")
        parser.add_argument("--opset", type=int, default=None, help="default: the exporter's")
        parser.add_argument(
            "--tolerance",
            type=float,
            default=FP32_TOLERANCE,
            help="max |onnx - torch| / max |torch| for fp32 (default %(default)g)",
        )
        parser.add_argument(
            "--int8-tolerance",
            type=float,
            default=INT8_TOLERANCE,
            help="the same for the int8 model (default %(default)g)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OnnxFormat:
        return cls(
            int8=args.int8,
            exporter=args.exporter,
            tolerance=args.tolerance,
            int8_tolerance=args.int8_tolerance,
            opset=args.opset,
        )

    def targets(self, layout: RunLayout) -> list[Path]:
        return [layout.onnx_model] + ([layout.root / INT8_MODEL] if self.int8 else [])

    def write(
        self, spec: ExportSpec, staged: Mapping[Path, Path], log: Log
    ) -> dict[Path, dict[str, Any]]:
        targets = list(staged)
        fp32 = staged[targets[0]]
        used, dynamo_failure = export_spec(spec, fp32, self.exporter, self.opset)
        if used == "dynamo":
            log("exporter: dynamo (torch.export)")
        elif dynamo_failure:
            log(f"exporter: torchscript (classic); dynamo could not: {dynamo_failure}")
        else:
            log("exporter: torchscript (classic), as asked")
        report = check_against_torch(spec, fp32, self.tolerance)
        log(f"fp32 vs torch: {report.summary()}")
        require_within(report, "the exported model", "--tolerance")
        shared = {
            "exporter": used,
            "exporter_note": dynamo_failure,
            "tools": tool_versions(used),
        }
        metadata = {targets[0]: {**shared, "precision": "fp32", **describe_graph(fp32)}}
        metadata[targets[0]]["check"] = report.as_json()
        if not self.int8:
            return metadata

        int8 = staged[targets[1]]
        quantize_int8(fp32, int8)
        int8_report = check_against_torch(spec, int8, self.int8_tolerance)
        log(f"int8 vs torch: {int8_report.summary()}")
        require_within(int8_report, "the int8 model", "--int8-tolerance")
        sizes = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
        log(
            f"size: fp32 {sizes['fp32'] / 1e3:.1f} kB, int8 {sizes['int8'] / 1e3:.1f} kB "
            f"({sizes['int8'] / sizes['fp32']:.2f}x)"
        )
        metadata[targets[1]] = {
            **shared,
            "precision": INT8_PRECISION,
            **describe_graph(int8),
            "check": int8_report.as_json(),
            "size_bytes_fp32": sizes["fp32"],
        }
        test_split = compare_on_test_split(spec, fp32, int8, log)
        if test_split is not None:
            for meta in metadata.values():
                meta["test_split"] = test_split
        return metadata
