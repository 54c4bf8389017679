"""Failures a rented machine meets, each as one line and a clear exit code (issue 22).

Real processes on a real small disk: a tmpfs this test mounts (skipped with the reason where
mounting is not allowed) and a filler file that leaves room for two checkpoints but not
three. A full disk exits 74 with one line, keeps the newest complete checkpoint, and the same
command resumes bit-identically once there is room; with the S3 mirror the run deletes local
checkpoints already verified in S3 and goes on. GPU out of memory (raised on the CPU) is one
line and exit 1. A SIGTERM while test() runs exits 75, never by the signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from src.checkpoints.disk_space import disk_need_bytes, shortfall_line
from src.checkpoints.record import verify_files
from src.checkpoints.sidecar import read_checkpoint_infos
from src.common.errors import EXIT_DISK_FULL, DiskFullError, human_bytes
from src.common.signals import EXIT_INTERRUPTED
from src.launch.experiment import take_debug_flag
from src.remote.runs import describe_exit
from src.slurm.batch_job import MULTINODE, NOTICE, decide
from src.storage.s3 import download_verified
from tests.support.experiment import (
    REPO_ROOT,
    assert_bit_identical,
    assert_same_history,
    experiment_env,
    run_experiment,
    start_experiment,
)
from tests.support.moto_server import AWS_ENV, running_moto_s3

TINY_LM = REPO_ROOT / "tests" / "support" / "tiny_lm_experiment.py"
BUCKET = "full-disk-bucket"
PAGE = 4096  # tmpfs counts whole pages
# 12 steps an epoch, 2 epochs; a checkpoint every 3 steps: the third (step 9) will not fit.
SETTINGS = [
    "data.num_sequences=192",
    "trainer.max_epochs=2",
    "checkpoint.every_n_steps=3",
    "checkpoint.keep_last_n=3",
]
HISTORY_KEYS = ("epoch", "step", "train_loss", "val_loss", "val_acc")


def tiny_args(output_dir: Path, run_name: str, *extra: str) -> list[str]:
    return [f"paths.output_dir={output_dir}", f"run_name={run_name}", *SETTINGS, *extra]


def run_tiny(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return run_experiment(args, env=experiment_env(**env), experiment=TINY_LM)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, uninterrupted, on a roomy disk."""
    output = tmp_path_factory.mktemp("reference")
    done = run_tiny(tiny_args(output, "ref"))
    assert done.returncode == 0, done.stderr
    return output / "ref"


@contextmanager
def small_disk(mount_point: Path, size_bytes: int) -> Iterator[Path]:
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip() or 'not root'}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def leave_free(volume: Path, free_bytes: int) -> Path:
    """A filler file that leaves ``free_bytes`` free on ``volume``; delete it to make room."""
    filler = volume / "filler.bin"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, os.statvfs(volume).f_bavail * PAGE - free_bytes)
    return filler


def checkpoint_pages(reference: Path) -> int:
    size = next((reference / "checkpoints").glob("step_*.pt")).stat().st_size
    return -(-size // PAGE) * PAGE


def room_for_two_and_a_half(reference: Path) -> int:
    """Two checkpoints (with their sidecars), half of a third, a few small files."""
    one = checkpoint_pages(reference) + PAGE
    return 2 * one + one // 2 + 4 * PAGE


def newest_verifies(run_dir: Path) -> int:
    newest = read_checkpoint_infos(run_dir / "checkpoints")[0]
    assert verify_files(newest) is None
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "a temp file was left"
    return newest.step


def test_disk_full_is_one_line_and_exit_74_then_resumes(tmp_path: Path, reference: Path) -> None:
    with small_disk(tmp_path / "volume", 8 * 1024 * 1024) as volume:
        filler = leave_free(volume, room_for_two_and_a_half(reference))
        args = tiny_args(volume / "out", "full")
        full = run_tiny(args)
        assert full.returncode == EXIT_DISK_FULL, full.stderr
        assert "Traceback" not in full.stderr
        lines = full.stderr.strip().splitlines()
        warning = next(i for i, line in enumerate(lines) if "warning: disk space:" in line)
        assert "checkpoint.keep_last_n=3 needs" in lines[warning]
        last = lines[-1]
        assert last.startswith("disk full: writing ") and "step_000000009.pt needs ~" in last
        newest = read_checkpoint_infos(volume / "out" / "full" / "checkpoints")[0]
        assert f"needs ~{human_bytes(newest.size)}, " in last  # the last checkpoint's size
        assert " free there;" in last and "lower checkpoint.keep_last_n" in last
        assert "checkpoint.s3_bucket" in last and warning < len(lines) - 1
        run_dir = volume / "out" / "full"
        assert newest_verifies(run_dir) == 6

        filler.unlink()  # room again: the same command resumes
        resumed = run_tiny(args)
        assert resumed.returncode == 0, resumed.stderr
        assert "at step 6 " in resumed.stdout + resumed.stderr
        assert_bit_identical(run_dir / "final_model.pt", reference / "final_model.pt")
        assert_same_history(run_dir, reference, HISTORY_KEYS)


def test_with_s3_verified_local_checkpoints_make_room(
    tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with running_moto_s3() as s3, small_disk(tmp_path / "volume", 8 * 1024 * 1024) as volume:
        s3.reset()
        s3.client().create_bucket(Bucket=BUCKET)
        leave_free(volume, room_for_two_and_a_half(reference))
        args = tiny_args(
            volume / "out",
            "mirrored",
            f"checkpoint.s3_bucket={BUCKET}",
            f"checkpoint.endpoint_url={s3.endpoint_url}",
        )
        done = run_tiny(args, **AWS_ENV)
        assert done.returncode == 0, done.stderr
        assert "disk full: deleted the local step_000000003.pt (verified in s3://" in done.stderr
        run_dir = volume / "out" / "mirrored"
        assert_bit_identical(run_dir / "final_model.pt", reference / "final_model.pt")
        assert_same_history(run_dir, reference, HISTORY_KEYS)
        assert json.loads((run_dir / "test_results.json").read_text())["global_step"] == 24


def test_gpu_out_of_memory_is_one_line_and_exit_1(tmp_path: Path) -> None:
    args = tiny_args(tmp_path, "oom")
    failed = run_tiny(args, TINY_LM_OOM_AT_CALL="5")
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("GPU out of memory: in a training step at batch size 16 per device")
    for fix in ("data.batch_size: auto", "trainer.grad_accum_steps", "trainer.precision=bf16"):
        assert fix in last
    assert "gradient_checkpointing" not in last
    assert newest_verifies(tmp_path / "oom") == 3

    debug = run_tiny([*args, "run_name=oom-debug"], TINY_LM_OOM_AT_CALL="5", LOGLEVEL="DEBUG")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "torch.OutOfMemoryError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("GPU out of memory: ")


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_is_the_same_one_line(tmp_path: Path) -> None:
    args = [*tiny_args(tmp_path, "real-oom"), "trainer.device=cuda"]
    failed = run_tiny(args, TINY_LM_OOM_AT_CALL="5", TINY_LM_REAL_OOM="1")
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("GPU out of memory: in a training step at batch size 16 per device")
    assert newest_verifies(tmp_path / "real-oom") == 3


def test_sigterm_during_test_exits_75_not_by_the_signal(tmp_path: Path) -> None:
    env = experiment_env(TINY_LM_TEST_STEP_SECONDS="1")
    process = start_experiment(tiny_args(tmp_path, "late"), env=env, experiment=TINY_LM)
    assert process.stdout is not None
    for line in process.stdout:  # training first; then test() starts on the slow test set
        if line.strip() == "testing":
            break
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode in (EXIT_INTERRUPTED, 0), (process.returncode, err)
    assert "received after the last step" in err
    results = tmp_path / "late" / "test_results.json"
    assert not results.exists() or json.loads(results.read_text())["global_step"] == 24
    assert (tmp_path / "late" / "final_model.pt").is_file()
    if process.returncode == EXIT_INTERRUPTED:  # the same command writes the test results
        again = run_tiny(tiny_args(tmp_path, "late"))
        assert again.returncode == 0, again.stderr
        assert json.loads(results.read_text())["global_step"] == 24


def test_exit_74_is_known_to_remote_train_and_never_requeued() -> None:
    assert describe_exit(EXIT_DISK_FULL) == "disk full"
    outcome = decide(EXIT_DISK_FULL, NOTICE.name, MULTINODE, "r")
    assert not outcome.requeue and "disk full (exit 74)" in outcome.message


def test_the_room_estimate_and_its_warning(tmp_path: Path) -> None:
    assert disk_need_bytes(13_000_000, 3, 4_000_000) == 73_000_000
    assert shortfall_line(tmp_path, checkpoint_bytes=1, keep_last_n=3) is None
    huge = shortfall_line(tmp_path, checkpoint_bytes=10**15, keep_last_n=3, used_bytes=10**15)
    assert huge is not None and "checkpoint.keep_last_n=3 needs ~5000000.0 GB" in huge
    with pytest.raises(DiskFullError, match="needs ~1000000.0 GB"):  # before any download
        download_verified(None, BUCKET, "key", tmp_path / "big.pt", size=10**15)
    error = DiskFullError(tmp_path / "x.pt", 2_000_000)
    assert error.line.startswith(f"disk full: writing {tmp_path / 'x.pt'} needs ~2.0 MB, ")
    assert take_debug_flag(["--debug", "seed=3"]) == ["seed=3"]
    assert take_debug_flag(["seed=3"]) == ["seed=3"]
