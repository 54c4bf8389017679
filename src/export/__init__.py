"""Export: a finished run's weights -> files that serve it elsewhere: ONNX (runs without
torch), and for a LoRA run its adapter, a merged Hugging Face model and GGUF (``hf``).

From the bottom up; a module imports only modules above it in this list:

- ``errors``: ``ExportError`` (exit 2) and ``CheckFailedError`` (exit 1), one line each
- ``sidecar``: ``<target>.json`` beside each exported file or directory, and the check that
  what is there (after a copy home, say) is what it lists
- ``staging``: a checked temp file or directory renamed into place (an older export
  swapped out atomically), the listing of a directory's files
- ``specs``: ``ExportSpec``, how a run's model is rebuilt and fed, and its registry
- ``format``: the ``ExportFormat`` protocol a format implements, and ``AdapterRun``
- ``onnx/``: ``OnnxFormat``, the first format (needs torch, onnx, onnxscript, onnxruntime,
  imported only where used)
- ``hf/``: ``HfFormat``: a PEFT run's adapter; ``--merge`` and ``--gguf`` (transformers and
  peft imported only for ``--merge``)
- ``inference``: ``OnnxModel``, which needs only onnxruntime and numpy (the laptop side)
- ``builtin_specs``: the template's and the char LM's specs, registered on import
- ``registry``: the formats by name (``onnx``, ``hf``); imports no torch
- ``arguments``: the export command's options, parsed without torch (``remote_train``
  checks ``--export-args`` with them and knows which files come home)
- ``run_checks``: a finished run nobody trains in, its lock, its weights or adapter
- ``pipeline``: ``export_run(run_dir, fmt, weights)``: checks, lock, the format's source
  (a spec or the adapter), its targets to temp paths, atomic rename, sidecars
- ``cli``: ``scripts/export.py --format FORMAT`` and ``scripts/export_onnx.py``

Nothing is imported here, so ``from src.export.inference import OnnxModel`` never pulls in
torch.
"""
