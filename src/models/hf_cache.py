"""Where the Hugging Face hub cache lives: on the persistent volume when there is one.

A base model is gigabytes. On a rented box the container disk dies with the instance but
``/workspace`` survives, so the cache goes to ``/workspace/.cache/huggingface`` and a re-run
(or a resumed run) never downloads the base again. ``huggingface_hub`` reads ``HF_HOME`` once,
when it is first imported, so ``use_persistent_hf_cache()`` must run before anything imports
``transformers`` or ``peft``: this module imports neither.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from src.common.paths import VOLUME_ROOT

HF_CACHE_ON_VOLUME = Path(".cache") / "huggingface"  # under /workspace
_announced: set[Path] = set()  # say the cache's place once per process


def default_hf_home() -> Path:
    """huggingface_hub's default: ``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``."""
    cache_root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_root) / "huggingface"


def use_persistent_hf_cache() -> Path:
    """Point ``HF_HOME`` at the volume (unless it is set) and return the cache directory.

    ``HF_HOME`` already set (by the user, ``.env`` or a launcher) wins; without a writable
    ``/workspace`` the default cache stays. Prints one line saying where the cache is, and a
    warning when ``huggingface_hub`` was imported first (it would not see the change).
    """
    if os.environ.get("HF_HOME"):
        hf_home = Path(os.environ["HF_HOME"]).expanduser()
        where = "HF_HOME"
    elif VOLUME_ROOT.is_dir() and os.access(VOLUME_ROOT, os.W_OK):
        hf_home = VOLUME_ROOT / HF_CACHE_ON_VOLUME
        hf_home.mkdir(parents=True, exist_ok=True)
        if "huggingface_hub" in sys.modules:  # its constants are fixed: the change is too late
            print(
                f"[hf] warning: huggingface_hub was imported before use_persistent_hf_cache(); "
                f"downloads go to {default_hf_home()}, not {hf_home}",
                file=sys.stderr,
            )
        os.environ["HF_HOME"] = str(hf_home)
        where = "the persistent volume"
    else:
        hf_home = default_hf_home()
        where = "no /workspace volume here"
    if hf_home not in _announced:
        _announced.add(hf_home)
        print(f"[hf] Hugging Face cache: {hf_home} ({where})")
    return hf_home
