"""Export a finished run to ONNX and run it without torch (a laptop CPU, say).

- ``src.export.onnx_export``: ``export_run(run_dir, weights=..., int8=...)`` writes
  ``model.onnx`` + ``model.onnx.json`` after checking onnxruntime against torch
  (needs torch, onnx, onnxscript, onnxruntime: the training machine).
- ``src.export.specs``: how a run's model is rebuilt and fed (``ExportSpec``); the template
  and char LM are built in, your own model registers one or is named with ``--spec``.
- ``src.export.inference``: ``OnnxModel``, which needs only onnxruntime and numpy.

Nothing is imported here, so ``from src.export.inference import OnnxModel`` never pulls in
torch.
"""
