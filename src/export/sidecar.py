"""Where an exported file's metadata lives: ``<file>.json`` beside it, for every format.

Standard library only: the laptop side (``src.export.inference``) reads it without torch.
"""

from __future__ import annotations

import os
from pathlib import Path


def metadata_path_for(model_path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (the sidecar the exporter writes)."""
    path = Path(model_path)
    return path.with_name(path.name + ".json")
