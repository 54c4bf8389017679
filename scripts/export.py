"""Export a finished run in a registered format, checked before it is kept.

    python scripts/export.py outputs/template-dev --format onnx            # = export_onnx.py
    python scripts/export.py outputs/char-lm-dev --format onnx --weights final --int8
    python scripts/export.py outputs/llm-sft-dev --format hf --merge       # LoRA: export_hf/
    python scripts/export.py outputs/llm-sft-dev --format hf --gguf --llama-cpp ~/llama.cpp

``--format`` (onnx, hf) decides which further options there are: ``--format hf -h`` lists
them. Exit 0, 2 (bad input) or 1 (the export disagrees with its source); on failure
nothing is written. The logic is in src/export/; remote_train --export FORMAT runs this.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from src.export.cli import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))
