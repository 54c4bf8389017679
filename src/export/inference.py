"""Run an exported model with onnxruntime and numpy only: no torch on the laptop.

    from src.export.inference import OnnxModel

    model = OnnxModel("outputs/template-dev/model.onnx")
    logits = model(features)  # float32 [batch, num_features] -> [batch, num_classes]
    probs = model.probs(features)  # softmax over the last axis

``model.onnx.json`` beside the file (written by ``scripts/export_onnx.py``) is read when it
is there: its sha256 must match the file (a half-copied model fails here, not later with
garbage outputs), and its extra fields (the char LM's ``vocab``, say) are in ``.metadata``.
This module must not import torch: a test loads it with ``import torch`` made to fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from src.common.atomic_io import sha256_file
from src.export.onnx.dtypes import ONNX_TO_NUMPY
from src.export.sidecar import metadata_path_for

__all__ = ["ONNX_TO_NUMPY", "OnnxModel", "log_softmax", "metadata_path_for", "softmax"]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)  # no overflow in exp
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class OnnxModel:
    """An onnxruntime session with numpy in, numpy out.

    ``model(x)`` takes inputs positionally (in the model's input order) or by name, converts
    them to the dtype the graph expects, and returns the single output (or a dict when there
    are several). A sample without its batch axis (``[num_features]``, ``[T]``) gets one
    added and removed again. ``providers``: onnxruntime execution providers (default CPU;
    ``["CoreMLExecutionProvider", "CPUExecutionProvider"]`` on a Mac). ``threads``: intra-op
    threads (default: onnxruntime's, one per core).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
        check_sha256: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path} not found: export the run first "
                "(python scripts/export_onnx.py RUN_DIR) and copy model.onnx with its .json"
            )
        sidecar = metadata_path_for(self.path)
        self.metadata: dict[str, Any] = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        expected = self.metadata.get("sha256")
        if check_sha256 and expected and sha256_file(self.path) != expected:
            raise ValueError(
                f"{self.path} does not match the sha256 in {sidecar.name}: the copy is "
                "incomplete or the files are from different exports; copy both again"
            )
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.path), options, providers=providers or ["CPUExecutionProvider"]
        )
        self.inputs = self.session.get_inputs()
        self.input_names = [node.name for node in self.inputs]
        self.output_names = [node.name for node in self.session.get_outputs()]

    def __call__(self, *args: Any, **named: Any) -> np.ndarray | dict[str, np.ndarray]:
        if len(args) > len(self.inputs):
            raise TypeError(f"{len(args)} inputs given, the model takes {self.input_names}")
        given = {**dict(zip(self.input_names, args, strict=False)), **named}
        missing = [name for name in self.input_names if name not in given]
        unknown = sorted(set(given) - set(self.input_names))
        if missing or unknown:
            raise TypeError(
                f"the model takes {self.input_names}; missing {missing}, unknown {unknown}"
            )
        feeds = {
            node.name: np.asarray(given[node.name], dtype=ONNX_TO_NUMPY.get(node.type))
            for node in self.inputs
        }
        # One sample without its batch axis: add it here, take it off the outputs below.
        unbatched = all(feeds[node.name].ndim == len(node.shape) - 1 for node in self.inputs)
        if unbatched:
            feeds = {name: value[np.newaxis] for name, value in feeds.items()}
        outputs = self.session.run(None, feeds)
        if unbatched:
            outputs = [output[0] for output in outputs]
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.output_names, outputs, strict=True))

    def probs(self, *args: Any, **named: Any) -> np.ndarray:
        """Softmax of the first output over its last axis: class (or next-token)
        probabilities for a model that outputs logits, as both built-in models do."""
        outputs = self(*args, **named)
        first = outputs[self.output_names[0]] if isinstance(outputs, dict) else outputs
        return softmax(first.astype(np.float64)).astype(np.float32)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{node.name}{list(node.shape)}" for node in self.inputs)
        return f"OnnxModel({str(self.path)!r}, inputs: {shapes}, outputs: {self.output_names})"
