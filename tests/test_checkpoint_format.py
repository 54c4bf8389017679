"""The checkpoint format seam: records, the sidecar, a multi-file format, the save policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.checkpoints import CheckpointFormat, CheckpointRecord, TorchFileFormat
from src.utils.checkpoint_manager import CheckpointManager
from tests.support.folder_format import FolderFormat


def test_torch_file_sidecar_keeps_its_flat_keys(tmp_path: Path) -> None:
    """Sidecars and manifests written before the seam existed read the same."""
    manager = CheckpointManager(tmp_path, async_save=False)
    manager.save({"w": torch.ones(3)}, 4, is_best=True, metadata={"epoch": 1})
    sidecar = json.loads((tmp_path / "step_000000004.json").read_text())
    assert list(sidecar) == [
        "step", "file", "sha256", "size", "is_best", "created_at", "metadata"
    ]  # fmt: skip
    assert sidecar["file"] == "step_000000004.pt" and sidecar["metadata"] == {"epoch": 1}
    record = CheckpointRecord.from_json(sidecar, tmp_path)
    assert record.to_json() == sidecar and record.path == tmp_path / "step_000000004.pt"


def test_a_folder_format_fits_the_protocol(tmp_path: Path) -> None:
    folder_format: CheckpointFormat = FolderFormat()
    manager = CheckpointManager(
        tmp_path, keep_last_n=1, async_save=True, checkpoint_format=folder_format
    )
    for step in (1, 2, 3):
        manager.save({"model": {"w": torch.full((4,), float(step))}, "step": step}, step)
    manager.wait()
    assert [record.step for record in manager.list_checkpoints()] == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000003", "step_000000003.json"]
    record = manager.list_checkpoints()[0]
    assert [part.name for part in record.files] == [
        "step_000000003/model.pt",
        "step_000000003/step.pt",
    ]
    assert CheckpointRecord.from_json(record.to_json(), tmp_path) == record
    state, info = manager.load_latest()
    assert info.step == 3 and state["step"] == 3
    (tmp_path / "step_000000003" / "step.pt").write_bytes(b"damaged")
    assert manager.verify(info) == "step_000000003/step.pt: size 7 != recorded " + str(
        info.files[1].size
    )


def test_torch_file_format_is_a_checkpoint_format() -> None:
    checkpoint_format: CheckpointFormat = TorchFileFormat()
    assert checkpoint_format.location(Path("c"), 12) == Path("c/step_000000012.pt")


@pytest.mark.parametrize(
    ("step", "stopping", "epoch_end", "expected"),
    [
        (10, False, False, True),  # periodic
        (11, False, False, False),
        (10, False, True, False),  # the epoch-end checkpoint comes after evaluation
        (11, True, False, True),  # a stop always saves
        (10, True, True, True),
    ],
)
def test_save_policy(
    tmp_path: Path, step: int, stopping: bool, epoch_end: bool, expected: bool
) -> None:
    manager = CheckpointManager(tmp_path, every_n_steps=5, async_save=False)
    built = []
    saved = manager.save_if_due(
        step, lambda: built.append(step) or {"step": step}, stopping=stopping, epoch_end=epoch_end
    )
    assert saved is expected and bool(built) is expected
    assert [record.step for record in manager.list_checkpoints()] == ([step] if expected else [])


def test_every_n_steps_zero_saves_only_at_stops(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, async_save=False)
    assert not manager.due(100) and manager.due(100, stopping=True)
    with pytest.raises(ValueError, match="every_n_steps"):
        CheckpointManager(tmp_path, every_n_steps=-1)
