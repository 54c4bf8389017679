"""onnxruntime's type strings -> numpy dtypes (numpy only: the laptop imports it)."""

from __future__ import annotations

import numpy as np

# onnxruntime's type strings -> the numpy dtype an input is converted to.
ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
