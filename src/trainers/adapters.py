"""A PEFT model's outputs: ``best_adapter/`` and ``final_adapter/`` in PEFT's own layout.

``save_pretrained`` writes ``adapter_config.json`` + ``adapter_model.safetensors``: what
``PeftModel.from_pretrained(base, path)`` loads, what vLLM serves as a LoRA, and what the
``hf`` export merges. Each folder is written whole under a temp name and renamed into place
(``atomic_write_dir``), before the checkpoint that names it commits.

PEFT is imported only when a PEFT model is there: a model is recognised by its attributes,
so a plain PyTorch user needs no peft installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from src.common.atomic_io import atomic_write_dir

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SET_VALUED_KEYS = ("target_modules", "modules_to_save", "exclude_modules")


def is_peft_model(model: nn.Module) -> bool:
    """A ``peft.PeftModel``: adapters over a base, saved with ``save_pretrained``."""
    return all(hasattr(model, name) for name in ("peft_config", "disable_adapter", "base_model"))


def save_adapter(model: nn.Module, directory: Path) -> None:
    """``model.save_pretrained`` into ``directory``, replacing it whole and durably."""

    def fill(temp: Path) -> None:
        model.save_pretrained(str(temp))
        _sort_config_lists(temp / ADAPTER_CONFIG)

    atomic_write_dir(directory, fill)


def _sort_config_lists(path: Path) -> None:
    """PEFT keeps ``target_modules`` as a set, so the JSON list's order changes with Python's
    hash seed; sorted, the same training gives the same bytes (comparable, cacheable)."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    for key in SET_VALUED_KEYS:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def load_adapter_weights(model: nn.Module, directory: Path) -> None:
    """Put a saved adapter's weights into ``model``'s active adapter (the best, for a test)."""
    # peft only here: imported for PEFT models alone (plain users need not install it).
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(directory) / ADAPTER_WEIGHTS)))
