"""``--gguf``: the merged model through llama.cpp's ``convert_hf_to_gguf.py``.

llama.cpp is not a dependency of this repo: the user names a checkout (``--llama-cpp DIR`` or
``LLAMA_CPP_DIR``) whose requirements are installed in this Python. Without one the export is
refused in one line, before anything is loaded or written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from src.export.errors import CheckFailedError, ExportError
from src.export.format import Log

CONVERTER = "convert_hf_to_gguf.py"
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
GET_LLAMA_CPP = (
    "git clone https://github.com/ggml-org/llama.cpp && pip install -r llama.cpp/requirements.txt"
)
# convert_hf_to_gguf.py --outtype: auto is the highest-fidelity 16-bit type of the weights.
GGUF_TYPES = ("f16", "bf16", "q8_0", "f32", "auto")
GGUF_MAGIC = b"GGUF"


def find_converter(llama_cpp: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """``convert_hf_to_gguf.py`` in ``llama_cpp`` (else ``$LLAMA_CPP_DIR``); ExportError in
    one line saying what is missing and where to get it."""
    checkout = llama_cpp or environ.get(LLAMA_CPP_ENV, "").strip()
    if not checkout:
        raise ExportError(
            f"--gguf needs llama.cpp's {CONVERTER}: pass --llama-cpp DIR or set "
            f"{LLAMA_CPP_ENV} to a llama.cpp checkout (get one: {GET_LLAMA_CPP})"
        )
    where = "--llama-cpp" if llama_cpp else LLAMA_CPP_ENV
    converter = Path(checkout).expanduser() / CONVERTER
    if not converter.is_file():
        raise ExportError(
            f"{where} {checkout}: no {CONVERTER} there, so it is not a llama.cpp checkout "
            f"(get one: {GET_LLAMA_CPP})"
        )
    return converter.resolve()


def checkout_commit(converter: Path) -> str | None:
    """The llama.cpp checkout's commit, for the sidecar (None when it is not a git tree)."""
    try:
        found = subprocess.run(
            ["git", "-C", str(converter.parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if found.returncode != 0:
        return None
    return found.stdout.strip() or None


def convert(
    converter: Path, merged_dir: Path, outfile: Path, outtype: str, log: Log
) -> dict[str, Any]:
    """Run the converter on ``merged_dir`` into ``outfile``; its metadata for the sidecar.

    ExportError (one line: its last line of output) when it fails, CheckFailedError when it
    claims success but wrote no GGUF file.
    """
    command = [sys.executable, str(converter), str(merged_dir)]
    command += ["--outfile", str(outfile), "--outtype", outtype]
    log(
        f"gguf: {converter.name} {merged_dir.name}/ --outtype {outtype} (llama.cpp at "
        f"{converter.parent})"
    )
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise ExportError(f"cannot run {converter}: {error}") from None
    if done.returncode != 0:
        # A traceback ends on stderr; stdout only when the converter printed nothing there.
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        lines = lines or [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        hint = ""
        if "ModuleNotFoundError" in last or "ImportError" in last:
            requirements = converter.parent / "requirements.txt"
            hint = f" (install llama.cpp's requirements: pip install -r {requirements})"
        raise ExportError(f"{converter.name} exited with code {done.returncode}: {last}{hint}")
    if not outfile.is_file():
        raise CheckFailedError(f"{converter.name} exited 0 but wrote no {outfile.name}")
    with open(outfile, "rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise CheckFailedError(f"{outfile.name} is not a GGUF file (no GGUF magic)")
    size = outfile.stat().st_size
    log(f"gguf: {outfile.name}, {size / 1e6:.2f} MB")
    return {
        "file": outfile.name,
        "outtype": outtype,
        "converter": str(converter),
        "llama_cpp_commit": checkout_commit(converter),
    }
