"""ONNX, the first export format: ``OnnxFormat`` (``format``) and its parts.

- ``exporters``: ``torch.onnx.export``, the dynamo exporter first, TorchScript as fallback
- ``check``: onnxruntime against torch on the same random inputs, with a tolerance
- ``int8``: dynamic int8 quantization and the test-split comparison with fp32
- ``graph``: the file's inputs, outputs, opset and the tool versions, for the sidecar
- ``dtypes``: onnxruntime type names -> numpy (shared with ``src.export.inference``)

Nothing is imported here, and torch, onnx and onnxruntime only inside the functions that
need them: listing the formats (``src.export.registry``) works on a laptop without them.
"""
