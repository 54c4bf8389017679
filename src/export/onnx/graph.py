"""What an ONNX file's sidecar says about it: inputs, outputs, opset, and the tools that
made it."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from src.export.onnx.check import session
from src.export.onnx.dtypes import ONNX_TO_NUMPY


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
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    loaded = session(path)

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
        "inputs": nodes(loaded.get_inputs()),
        "outputs": nodes(loaded.get_outputs()),
    }
