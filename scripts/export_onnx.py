"""Export a finished run to ONNX, checked against torch; optionally int8 too.

    python scripts/export_onnx.py outputs/template-dev                 # best_model.pt -> model.onnx
    python scripts/export_onnx.py outputs/charlm-dev --weights final --int8
    python scripts/export_onnx.py outputs/my-run --spec src.models.my_model:onnx_spec

Writes model.onnx + model.onnx.json (and model.int8.onnx + .json with --int8) into the run
directory. Bad input (no weights, an unfinished run, an op no exporter can convert) is one
line on stderr and exit 2; an export that disagrees with torch is one line and exit 1.
Either way nothing is written. The logic is in src/export/onnx_export.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from src.export.onnx_export import (
    EXPORTERS,
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    ExportError,
    export_run,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="<paths.output_dir>/<run_name>")
    parser.add_argument("--weights", choices=["best", "final"], default="best")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx")
    parser.add_argument("--spec", help="module:function building your model's ExportSpec")
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
    args = parser.parse_args(argv)
    try:
        export_run(
            args.run_dir,
            args.weights,
            args.int8,
            spec=args.spec,
            exporter=args.exporter,
            tolerance=args.tolerance,
            int8_tolerance=args.int8_tolerance,
            opset=args.opset,
            log=lambda line: print(line, flush=True),
        )
    except ExportError as error:
        print(error.line, file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
