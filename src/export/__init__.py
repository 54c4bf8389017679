"""Export: a finished run's weights -> files a machine without torch runs (ONNX today).

From the bottom up; a module imports only modules above it in this list:

- ``errors``: ``ExportError`` (exit 2) and ``CheckFailedError`` (exit 1), one line each
- ``sidecar``: ``<file>.json`` beside each exported file
- ``specs``: ``ExportSpec``, how a run's model is rebuilt and fed, and its registry
- ``format``: the ``ExportFormat`` protocol a format implements
- ``onnx/``: ``OnnxFormat``, the first format (needs torch, onnx, onnxscript, onnxruntime,
  imported only where used)
- ``inference``: ``OnnxModel``, which needs only onnxruntime and numpy (the laptop side)
- ``builtin_specs``: the template's and the char LM's specs, registered on import
- ``registry``: the formats by name (``onnx``); imports no torch
- ``run_checks``: a finished run nobody trains in, its lock, its weights
- ``pipeline``: ``export_run(run_dir, fmt, weights)``: checks, lock, spec, the format's
  files to temp paths, atomic rename, sidecars
- ``cli``: ``scripts/export.py --format FORMAT`` and ``scripts/export_onnx.py``

Nothing is imported here, so ``from src.export.inference import OnnxModel`` never pulls in
torch.
"""
