"""Refuse to resume a run with other settings, or on another frozen base, than its
checkpoints were made with.

A mistyped override (another learning rate, another model width) would otherwise load the
old weights and silently train something else; a LoRA checkpoint loaded onto another base
(another model, revision, quantization, or changed weights) would train an adapter for a
model it was never made for. Both become a one-line error before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from src.checkpoints.frozen_base import describe_difference
from src.checkpoints.trainable_format import FROZEN_BASE_KEY
from src.common.errors import ConfigError
from src.config import accumulation_for, resume_settings
from src.runs.files import run_dir_for
from src.runs.layout import RunLayout
from src.utils.checkpoint_manager import read_checkpoint_infos


def require_same_settings(
    cfg: DictConfig, world_size: int, saved: Any, where: str | None = None
) -> None:
    """Raise ConfigError when ``saved`` (a checkpoint's recorded RESUME_SETTINGS) differs from
    what ``cfg`` gives now; ``saved`` not a dict: nothing to compare.

    The world size may change (ddp and fsdp): the data position is the global number of
    samples consumed in the epoch, and the model and optimizer load at any number of ranks
    (ddp's are whole, fsdp's reshard). Refused only where it cannot be honoured:
    ``trainer.keep_effective_batch`` with an effective batch the new ranks cannot make.
    """
    if not isinstance(saved, dict):
        return  # a new run, or checkpoints from before settings were recorded
    # world_size recorded since multi-rank resume checks, the strategy since fsdp.
    saved = {"world_size": 1, "trainer.strategy": "ddp", **saved}
    now = resume_settings(cfg, world_size)
    changed = sorted(
        key
        for key in saved.keys() | now.keys()
        if key != "world_size" and saved.get(key) != now.get(key)
    )
    if changed:
        diffs = ", ".join(f"{key}={saved.get(key)!r} (now {now.get(key)!r})" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"run '{cfg.run_name}' in {where or run_dir_for(cfg)} was checkpointed with "
            f"{diffs}{more}: resume with the same settings, or start fresh with a new run_name"
        )
    try:
        accumulation_for(cfg, saved, world_size)
    except ValueError as error:
        raise ConfigError(f"run '{cfg.run_name}' in {where or run_dir_for(cfg)}: {error}") from None


def require_same_base(
    cfg: DictConfig,
    saved_metadata: Mapping[str, Any],
    frozen_base: Mapping[str, Any] | None,
    where: str | None = None,
) -> None:
    """Raise ConfigError when a checkpoint's sidecar ``saved_metadata`` names another frozen
    base than ``frozen_base`` (the model built now; None: nothing of it is frozen)."""
    saved = saved_metadata.get(FROZEN_BASE_KEY)
    if saved is None:
        return  # a full checkpoint: it holds every weight, so any model of that shape loads it
    where = where or str(run_dir_for(cfg))
    if frozen_base is None:
        difference = "nothing of the model built now is frozen"
    else:
        difference = describe_difference(saved, frozen_base)
    if difference:
        raise ConfigError(
            f"run '{cfg.run_name}' in {where} was checkpointed on another frozen base: "
            f"{difference}; its checkpoints hold only the trained parameters, so load the "
            "same base, or start fresh with a new run_name"
        )


def check_resume_settings(
    cfg: DictConfig,
    world_size: int = 1,
    *,
    saved: Mapping[str, Any] | None = None,
    where: str | None = None,
) -> None:
    """Refuse to resume a run whose newest checkpoint was made with other RESUME_SETTINGS.

    Reads the newest local sidecar unless ``saved`` is given. ``saved`` / ``where``: the
    settings of a checkpoint elsewhere (the S3 mirror's newest). ``open_run`` does this
    check with the sidecars it has already read.
    """
    if saved is None:
        infos = read_checkpoint_infos(RunLayout(run_dir_for(cfg)).checkpoints)
        saved = infos[0].metadata.get("resume_settings") if infos else None
    require_same_settings(cfg, world_size, saved, where)
