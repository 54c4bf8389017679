"""Export a finished run to ONNX, checked against torch; optionally int8 too.

    python scripts/export_onnx.py outputs/template-dev                 # best_model.pt -> model.onnx
    python scripts/export_onnx.py outputs/charlm-dev --weights final --int8
    python scripts/export_onnx.py outputs/my-run --spec src.models.my_model:onnx_spec

Writes model.onnx + model.onnx.json (and model.int8.onnx + .json with --int8) into the run
directory. Bad input (no weights, an unfinished run, an op no exporter can convert) is one
line on stderr and exit 2; an export that disagrees with torch is one line and exit 1.
Either way nothing is written. The same as ``scripts/export.py RUN_DIR --format onnx``;
the logic is in src/export/ (the ONNX part in src/export/onnx/).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from src.export.cli import main

if __name__ == "__main__":
    sys.exit(main(fmt="onnx", description=__doc__.split("\n\n")[0]))
