"""CheckpointManager on real files: atomicity, checksums, pruning, async flushing."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from src.utils.checkpoint_manager import CheckpointManager


def state_for(step: int, size: int = 1000) -> dict:
    return {"weights": torch.full((size,), float(step)), "step": step, "nested": [{"x": step}]}


def test_save_then_load_latest_roundtrip(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last_n=3, async_save=True)
    for step in (10, 20, 30):
        manager.save(state_for(step), step)
    manager.close()
    loaded = manager.load_latest()
    assert loaded is not None
    state, info = loaded
    assert info.step == 30 and state["step"] == 30
    assert torch.equal(state["weights"], torch.full((1000,), 30.0))
    assert state["nested"] == [{"x": 30}]
    assert manager.latest_path() == tmp_path / "step_000000030.pt"


def test_async_snapshot_is_taken_at_save_time(tmp_path: Path) -> None:
    """The caller may mutate its tensors right after save(): the checkpoint keeps the old values."""
    manager = CheckpointManager(tmp_path, async_save=True)
    weights = torch.zeros(1_000_000)
    manager.save({"weights": weights}, 1)
    weights += 1  # training goes on while the background thread writes
    manager.wait()
    state, _ = manager.load_latest()
    assert torch.count_nonzero(state["weights"]) == 0


def test_keeps_last_n_plus_best(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last_n=2, async_save=False)
    manager.save(state_for(1), 1)
    manager.save(state_for(2), 2, is_best=True)
    for step in (3, 4, 5):
        manager.save(state_for(step), step)
    assert [info.step for info in manager.list_checkpoints()] == [5, 4, 2]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "step_000000002.pt",
        "step_000000004.pt",
        "step_000000005.pt",
    ]


def test_best_model_file_written_from_snapshot(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", async_save=True)
    model_state = {"layer.weight": torch.arange(6.0)}
    manager.save({"model": model_state}, 7, is_best=True, best_model_path=tmp_path / "best.pt")
    manager.wait()
    assert torch.equal(torch.load(tmp_path / "best.pt")["layer.weight"], torch.arange(6.0))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_newest_falls_back_with_warning(
    tmp_path: Path, damage: str, capfd: pytest.CaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path, keep_last_n=3, async_save=False)
    for step in (1, 2, 3):
        manager.save(state_for(step), step)
    newest = tmp_path / "step_000000003.pt"
    if damage == "flip":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    elif damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:100])
    else:
        newest.unlink()
    state, info = manager.load_latest()
    assert info.step == 2 and state["step"] == 2
    assert "skipping checkpoint step_000000003.pt" in capfd.readouterr().err


def test_data_file_without_sidecar_is_never_loaded(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, async_save=False)
    manager.save(state_for(1), 1)
    torch.save(state_for(2), tmp_path / "step_000000002.pt")  # no sidecar: not committed
    (tmp_path / ".step_000000003.pt.123.tmp").write_bytes(b"partial")
    state, info = manager.load_latest()
    assert info.step == 1
    CheckpointManager(tmp_path)  # a new writer cleans the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000000001.json",
        "step_000000001.pt",
    ]


def test_background_write_error_surfaces_on_next_call(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", async_save=True)
    manager.save({"value": lambda: None}, 1)  # lambdas cannot be pickled
    with pytest.raises(RuntimeError, match="background checkpoint write failed"):
        manager.wait()


def test_non_writer_rank_writes_nothing(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", is_writer=False)
    manager.save(state_for(1), 1)
    manager.wait()
    assert not (tmp_path / "ckpt").exists()


def test_rejects_keep_last_zero(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last_n"):
        CheckpointManager(tmp_path, keep_last_n=0)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from src.utils.checkpoint_manager import CheckpointManager
    manager = CheckpointManager(sys.argv[1], keep_last_n=2, async_save=sys.argv[2] == "async")
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        manager.save({"weights": torch.full((2_000_000,), float(step)), "step": step}, step)
    """
)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_sigkill_mid_write_leaves_a_loadable_checkpoint(tmp_path: Path, mode: str) -> None:
    """A process saving 8 MB checkpoints in a loop is SIGKILLed at random moments."""
    rng = random.Random(mode)
    repo_root = Path(__file__).resolve().parents[1]
    for attempt in range(4):
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, str(tmp_path), mode],
            cwd=repo_root,
            stdout=subprocess.PIPE,
        )
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(0.3 + rng.uniform(0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        loaded = CheckpointManager(tmp_path, keep_last_n=2).load_latest()
        assert loaded is not None, f"attempt {attempt}: nothing loadable"
        state, info = loaded
        assert state["step"] == info.step
        assert torch.equal(state["weights"], torch.full((2_000_000,), float(info.step)))


EXIT_WITHOUT_WAIT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from src.utils.checkpoint_manager import CheckpointManager
    manager = CheckpointManager(sys.argv[1], async_save=True)
    manager.save({"weights": torch.full((4_000_000,), 7.0)}, 7)  # 16 MB, written in background
    print("returned", flush=True)
    # no wait(), no close(): the interpreter exits with the write in flight
    """
)


def test_pending_async_write_is_flushed_at_interpreter_exit(tmp_path: Path) -> None:
    repo_root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITHOUT_WAIT_SCRIPT, str(tmp_path)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "returned", done.stderr
    state, info = CheckpointManager(tmp_path).load_latest()
    assert info.step == 7 and torch.equal(state["weights"], torch.full((4_000_000,), 7.0))


def test_failed_write_prunes_nothing(tmp_path: Path) -> None:
    """Old checkpoints are removed only after the new one is complete."""
    manager = CheckpointManager(tmp_path, keep_last_n=1, async_save=False)
    manager.save(state_for(1), 1)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        manager.save({"value": lambda: None}, 2)
    assert [info.step for info in manager.list_checkpoints()] == [1]
    assert manager.load_latest()[1].step == 1
    assert not list(tmp_path.glob(".*.tmp")), "the temp file of the failed write is removed"
