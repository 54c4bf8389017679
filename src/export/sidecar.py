"""Where an export's metadata lives, ``<target>.json`` beside it, and the check that the
files still are what the export wrote (after a copy home, say).

A file target's sidecar holds its ``sha256`` and ``size_bytes``; a directory target's holds
``files``: each file's relative path -> ``sha256`` and ``size_bytes``.

No torch: the laptop side (``src.export.inference``, ``remote_train``'s verify) reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from src.common.atomic_io import sha256_file


def metadata_path_for(model_path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (the sidecar the exporter writes)."""
    path = Path(model_path)
    return path.with_name(path.name + ".json")


def _differs(path: Path, expected: dict[str, Any]) -> str | None:
    """Why ``path`` is not the file ``expected`` describes, or None when it is."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != expected.get("size_bytes"):
        return f"{path.stat().st_size} bytes, the sidecar says {expected.get('size_bytes')}"
    if sha256_file(path) != expected.get("sha256"):
        return "sha256 differs from the sidecar's"
    return None


def check_against_sidecar(target: str | os.PathLike[str]) -> list[str]:
    """Problems (one line each) between an exported file or directory and its sidecar; an
    empty list when every listed file is there with its sha256 and size and, for a
    directory, nothing else is."""
    target = Path(target)
    sidecar = metadata_path_for(target)
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        return [f"{sidecar}: cannot read the sidecar ({type(error).__name__})"]
    if "files" not in meta:
        problem = _differs(target, meta)
        return [f"{target}: {problem}"] if problem else []
    if not target.is_dir():
        return [f"{target}: missing (the directory {sidecar.name} describes)"]
    problems = []
    for relative, expected in meta["files"].items():
        problem = _differs(target / relative, expected)
        if problem:
            problems.append(f"{target / relative}: {problem}")
    listed = set(meta["files"])
    for path in sorted(target.rglob("*")):
        if path.is_file() and path.relative_to(target).as_posix() not in listed:
            problems.append(f"{path}: not in {sidecar.name}")
    return problems
