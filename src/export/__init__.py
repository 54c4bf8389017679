"""Export: a finished run's weights -> files a machine without torch runs (ONNX today).

Bottom to top (each module imports only those above it in this list):

- ``errors``: ``ExportError`` (exit 2) and ``CheckFailedError`` (exit 1), one line each
- ``sidecar``: ``<file>.json`` beside each exported file
- ``format``: the ``ExportFormat`` protocol a format implements
- ``specs``: ``ExportSpec``, how a run's model is rebuilt and fed, and its registry;
  ``builtin_specs`` registers the template's and the char LM's
- ``onnx/``: ``OnnxFormat``, the first format (needs torch, onnx, onnxscript, onnxruntime)
- ``registry``: the formats by name (``onnx``); imports no torch
- ``run_checks``: a finished run nobody trains in, its lock, its weights
- ``pipeline``: ``export_run(run_dir, fmt, weights)``: checks, lock, spec, the format's
  files to temp paths, atomic rename, sidecars
- ``cli``: ``scripts/export.py --format FORMAT`` and ``scripts/export_onnx.py``

``inference``: ``OnnxModel``, which needs only onnxruntime and numpy. Nothing is imported
here, so ``from src.export.inference import OnnxModel`` never pulls in torch.
"""
