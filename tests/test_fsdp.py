"""FSDP2 (``trainer.strategy=fsdp``) with sharded, asynchronous DCP checkpoints, as real
torchrun processes: two gloo ranks on the CPU, killed for real.

- SIGTERM to the group at a random step, re-run: bit-identical to an uninterrupted run;
- stopped at two ranks, resumed at one: each sample of the interrupted epoch read once;
- SIGKILL while a sharded save is being written: the previous checkpoint is used;
- mirrored to S3 (moto), the local run directory deleted: resumed from the bucket;
- ddp refuses, in one line, a world-size change it cannot honour;
- on a GPU (``-m gpu``): the same with NCCL, one rank.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from src.checkpoints.sharded_format import share
from src.common.errors import ConfigError
from src.data.resumable_sampler import ResumableSampler
from src.trainers.fsdp import block_class
from tests.support.experiment import (
    REPO_ROOT,
    assert_bit_identical,
    experiment_env,
    load_weights,
    newest_checkpoint_step,
    run_experiment,
    torchrun_command,
    wait_for_checkpoint,
)
from tests.support.moto_server import AWS_ENV, MotoS3, running_moto_s3

EXPERIMENT = REPO_ROOT / "tests" / "support" / "fsdp_experiment.py"
# 1640 train samples; two ranks of 32 per device x 2 micro-batches: 13 steps an epoch, 26 in
# all (accumulation and clipping on: the no-reshard path and the clip over shards run too).
WORKLOAD = [
    "data.num_samples=2048",
    "model.hidden_dim=64",
    "data.batch_size=32",
    "trainer.grad_accum_steps=2",
    "trainer.max_epochs=2",
    "trainer.early_stopping_patience=0",
    "trainer.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.every_n_steps=2",
    "trainer.strategy=fsdp",
]
TOTAL_STEPS = 26
BUCKET = "fsdp-bucket"


def fsdp_args(output_dir: Path, run_name: str, *extra: str, device: str = "cpu") -> list[str]:
    return [
        *WORKLOAD,
        f"trainer.device={device}",
        f"paths.output_dir={output_dir}",
        f"run_name={run_name}",
        *extra,
    ]


def env(**extra: str) -> dict[str, str]:
    return experiment_env(**AWS_ENV, **extra)


def run(ranks: int, args: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(ranks, args, EXPERIMENT),
        cwd=REPO_ROOT,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def start(ranks: int, args: list[str], **extra_env: str) -> subprocess.Popen:
    """In its own process group: a signal reaches the agent and every rank, as under Slurm."""
    return subprocess.Popen(
        torchrun_command(ranks, args, EXPERIMENT),
        cwd=REPO_ROOT,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_at(process: subprocess.Popen, run_dir: Path, step: int) -> tuple[str, str]:
    """SIGTERM to the group once a checkpoint at ``step`` or later is committed."""
    wait_for_checkpoint(process, run_dir, step, timeout=180)
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    # torchrun's agent, signalled itself, exits 1 whatever its workers did: their lines tell.
    assert "re-run to resume" in out, out + err
    return out, err


def stopped_step(out: str, ranks: int) -> int:
    stopped = re.findall(r"stopped by SIGTERM at step (\d+)", out)
    assert len(stopped) == ranks and len(set(stopped)) == 1, out  # one step for all ranks
    return int(stopped[0])


# ----- fast checks of the pieces ------------------------------------------------------


@pytest.mark.parametrize(("size", "before", "after"), [(1640, 2, 1), (1000, 8, 4), (37, 3, 5)])
def test_the_rest_of_an_epoch_is_shared_once_by_any_number_of_ranks(
    size: int, before: int, after: int
) -> None:
    """Stopped after k batches per rank at ``before`` ranks, the ``after`` ranks read every
    sample the first ones did not, each once (beyond the padding that evens their shares)."""
    for batches, per_device in ((0, 4), (1, 4), (3, 2)):
        first = [
            ResumableSampler(size, seed=3, rank=rank, world_size=before) for rank in range(before)
        ]
        read = [i for sampler in first for i in list(sampler)[: batches * per_device]]
        rest = []
        for rank in range(after):
            sampler = ResumableSampler(size, seed=3, rank=rank, world_size=after)
            sampler.set_epoch(0, global_start=len(read))
            rest += list(sampler)
        counts = Counter(read + rest)
        assert set(counts) == set(range(size))
        padding = -(-(size - len(read)) // after) * after - (size - len(read))
        assert sum(counts.values()) == size + padding


def test_the_blocks_to_shard_are_the_repeated_class_or_the_named_one() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([Block() for _ in range(3)])

    assert block_class(Net()) is Block
    assert block_class(Net(), "Linear") is nn.Linear
    assert block_class(nn.Linear(2, 2)) is None  # nothing repeats: the root alone
    with pytest.raises(ConfigError, match=r"trainer.fsdp_wrap='Layer' names no module"):
        block_class(Net(), "Layer")


# ----- real torchrun runs -------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks, never interrupted."""
    output_dir = tmp_path_factory.mktemp("fsdp-reference")
    result = run(2, fsdp_args(output_dir, "reference"))
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir / "reference"


def test_on_a_resume_the_ranks_hash_each_file_once_between_them() -> None:
    files = tuple(f"step/__{n}_0.distcp" for n in range(7))
    for world in (1, 2, 3, 8):
        shares = [share(files, rank, world) for rank in range(world)]
        assert sorted(name for part in shares for name in part) == sorted(files), world


def test_sigterm_at_a_random_step_then_rerun_is_bit_identical(
    tmp_path: Path, reference: Path
) -> None:
    """The stop checkpoint is written blocking; the periodic ones asynchronously (staged,
    then written while training went on). One byte of the stop checkpoint's rank-1 shard is
    flipped: the re-run finds the checksum wrong, starts from the newest asynchronous one and
    still ends bit-identical (the staged copy was the state of its step). The S3 test below
    resumes from a stop checkpoint itself."""
    args = fsdp_args(tmp_path, "fsdp")
    run_dir = tmp_path / "fsdp"
    checkpoints = run_dir / "checkpoints"
    out, err = stop_at(start(2, args, FSDP_STEP_SECONDS="0.03"), run_dir, random.randint(4, 16))
    step = stopped_step(out, 2)
    folder = checkpoints / f"step_{step:09d}"
    assert folder.with_suffix(".json").is_file()
    shards = sorted(path.name for path in folder.iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"], shards
    assert not (run_dir / "final_model.pt").exists()
    shard = folder / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, another sha256
    shard.write_bytes(bytes(data))
    previous = max(
        int(path.stem.split("_")[1])
        for path in checkpoints.glob("step_*.json")
        if int(path.stem.split("_")[1]) < step
    )

    resumed = run(2, args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    where = checkpoints / f"step_{previous:09d}"
    assert resumed.stdout.count(f"resuming from {where} at step {previous} ") == 1
    skipped = f"skipping checkpoint {folder.name}: {folder.name}/__1_0.distcp: checksum mismatch"
    assert skipped in resumed.stdout + resumed.stderr
    assert "world size changed" not in resumed.stdout
    # Consolidated: the plain model's keys and whole tensors, as export reads them.
    assert_bit_identical(run_dir / "final_model.pt", reference / "final_model.pt")
    assert_bit_identical(run_dir / "best_model.pt", reference / "best_model.pt")
    assert list(load_weights(run_dir / "final_model.pt")) == [
        "net.0.weight",
        "net.0.bias",
        "net.3.weight",
        "net.3.bias",
        "net.6.weight",
        "net.6.bias",
    ]


def test_a_sigterm_to_one_rank_during_validation_stops_both_there(tmp_path: Path) -> None:
    """Rank 1 alone is signalled at its 3rd validation batch; the sharded forward passes
    meet in collectives, so the ranks agree (every 8 batches) and both cut the validation
    short at the same batch, save the trained epoch and exit 75; the re-run validates it."""
    args = fsdp_args(tmp_path, "evalstop", "data.batch_size=8", "trainer.max_epochs=1")
    first = run(2, args, FSDP_RANK1_SIGTERM_AT_EVAL_BATCH="3")
    out = first.stdout
    assert out.count("validation of epoch 1 cut short by the stop") == 1, out + first.stderr
    stopped = re.findall(r"stopped by \S+ at step (\d+); re-run to resume", out)
    assert len(stopped) == 2 and len(set(stopped)) == 1, out  # both ranks, one step
    assert newest_checkpoint_step(tmp_path / "evalstop") == int(stopped[0])
    resumed = run(2, args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "epoch 1 is trained; validating it first" in resumed.stdout
    assert "test_loss" in resumed.stdout


def test_stopped_at_two_ranks_resumed_at_one_reads_each_sample_once(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    seen.mkdir()
    args = fsdp_args(tmp_path, "shrink", "trainer.max_epochs=1")  # 13 steps: one epoch
    run_dir = tmp_path / "shrink"
    out, _ = stop_at(
        start(2, args, FSDP_SEEN_DIR=str(seen), FSDP_STEP_SECONDS="0.05"),
        run_dir,
        random.randint(2, 8),
    )
    step = stopped_step(out, 2)
    assert step < 13
    first = Counter(int(line) for path in seen.glob("seen_*") for line in path.read_text().split())
    assert sum(first.values()) == step * 128  # 2 ranks x 32 x 2 micro-batches per step

    resumed = run(1, [*args, "trainer.keep_effective_batch=true"], FSDP_SEEN_DIR=str(seen))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    line = (
        "[trainer] world size changed: checkpointed on 2 rank(s), now 1; effective batch 128 "
        "= 32 per device x 1 rank(s) x 4 micro-batch(es) per optimizer step"
    )
    assert resumed.stdout.splitlines().count(line) == 1, resumed.stdout
    assert f"at step {step} " in resumed.stdout
    assert re.search(r"epoch 1/1 \| step 13/13 ", resumed.stdout), resumed.stdout  # same schedule
    both = Counter(int(line) for path in seen.glob("seen_*") for line in path.read_text().split())
    assert sorted(both) == list(range(1640))  # every train sample of the epoch ...
    assert set(both.values()) == {1}  # ... exactly once across both runs
    assert (run_dir / "final_model.pt").is_file()


def test_sigkill_during_an_async_sharded_save_uses_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    """A model large enough (~25 MB of state) that the kill lands while a save is written:
    saved every step, killed as soon as a folder newer than every committed checkpoint shows.
    A kill that lands just after a commit has nothing half-written: tried again (3 runs)."""
    for attempt in range(3):
        args = fsdp_args(
            tmp_path,
            f"killed{attempt}",
            "model.hidden_dim=1024",
            "model.num_layers=3",
            "checkpoint.every_n_steps=1",
            "checkpoint.keep_last_n=2",
            "trainer.max_steps=8",
        )
        run_dir = tmp_path / f"killed{attempt}"
        half_written = kill_while_writing(start(2, args), run_dir)
        if half_written is not None:
            break
    assert half_written is not None, "3 kills missed every save: no half-written folder"
    checkpoints = run_dir / "checkpoints"
    previous = newest_checkpoint_step(run_dir)

    resumed = run(2, args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {checkpoints / f'step_{previous:09d}'} at step {previous} " in (
        resumed.stdout
    )
    assert "skipping checkpoint" not in resumed.stdout + resumed.stderr  # never listed
    assert newest_checkpoint_step(run_dir) == 8
    assert not half_written.exists() or half_written.with_suffix(".json").exists()


def kill_while_writing(process: subprocess.Popen, run_dir: Path) -> Path | None:
    """SIGKILL the run while a checkpoint folder is written; that folder (None: missed)."""
    checkpoints = run_dir / "checkpoints"

    def writing() -> Path | None:  # a folder newer than every committed checkpoint, no sidecar
        newest = newest_checkpoint_step(run_dir)
        for folder in checkpoints.glob("step_*"):
            if folder.is_dir() and int(folder.name.split("_")[1]) > newest:
                if not folder.with_suffix(".json").exists():
                    return folder
        return None

    wait_for_checkpoint(process, run_dir, 2, timeout=180)
    deadline = time.monotonic() + 60
    while writing() is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    sigkill_tree(process.pid)  # the machine is gone: agent and ranks at once
    process.communicate(timeout=60)
    return writing()


def sigkill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it, the ranks first. torchrun starts its
    ranks in sessions of their own, so a SIGKILL to the agent's group alone misses them."""
    tree, todo = [], [pid]
    while todo:
        parent = todo.pop()
        tree.append(parent)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # the thread ended meanwhile
                pass
    for member in reversed(tree):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with running_moto_s3() as server:
        server.reset()
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def test_sharded_checkpoint_in_s3_resumes_on_a_fresh_disk(
    s3: MotoS3, tmp_path: Path, reference: Path
) -> None:
    s3_args = [
        f"checkpoint.s3_bucket={BUCKET}",
        "checkpoint.s3_prefix=ckpts",
        f"checkpoint.endpoint_url={s3.endpoint_url}",
    ]
    args = fsdp_args(tmp_path, "mirrored", *s3_args)
    run_dir = tmp_path / "mirrored"
    out, err = stop_at(start(2, args, FSDP_STEP_SECONDS="0.03"), run_dir, random.randint(2, 16))
    step = stopped_step(out, 2)
    assert f"S3 mirror up to date: step {step}" in out, out + err
    keys = [
        item["Key"]
        for item in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="ckpts/mirrored/")["Contents"]
    ]
    stem = f"ckpts/mirrored/checkpoints/step_{step:09d}"
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"):
        assert f"{stem}/{name}" in keys, keys
    shutil.rmtree(run_dir)  # the machine is gone, and its disk with it

    resumed = run(2, args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from s3://{BUCKET}/ckpts/mirrored/checkpoints/step_{step:09d} " in (
        resumed.stdout
    )
    assert_bit_identical(run_dir / "final_model.pt", reference / "final_model.pt")


def test_ddp_refuses_a_world_size_change_it_cannot_honour_in_one_line(tmp_path: Path) -> None:
    """One rank (effective batch 64) resumed at two with keep_effective_batch: 64 is no
    multiple of 64 per device x 2 ranks. Refused before anything is written."""
    args = [
        *fsdp_args(tmp_path, "grown", "trainer.max_steps=3", "data.batch_size=64"),
        "trainer.grad_accum_steps=1",
        "trainer.strategy=ddp",
    ]
    first = run_experiment(args, env(), experiment=EXPERIMENT)  # plain python: one rank
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = tmp_path / "grown"
    before = {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }
    grown = run(2, [*args, "trainer.max_steps=6", "trainer.keep_effective_batch=true"])
    assert grown.returncode != 0
    ours = [line for line in grown.stderr.splitlines() if "keep_effective_batch" in line]
    assert len(ours) == 1, grown.stderr
    assert "cannot keep the effective batch 64 (checkpointed on 1 rank(s)) on 2 rank(s)" in ours[0]
    assert "[trainer]" not in grown.stdout
    after = {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }
    assert after == before


def test_fsdp_outside_torchrun_and_an_unknown_strategy_are_one_line(tmp_path: Path) -> None:
    """Exit 2 with the fix in one line, no training started."""
    for strategy, expected in (
        ("fsdp", "trainer.strategy=fsdp shards over the ranks of torchrun"),
        ("zero3", "trainer.strategy"),
    ):
        args = fsdp_args(tmp_path, strategy, f"trainer.strategy={strategy}")
        result = run_experiment(args, env(), experiment=EXPERIMENT)  # plain python
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert "[trainer]" not in result.stdout
        assert not (tmp_path / strategy / "checkpoints").exists()


@pytest.mark.gpu
def test_fsdp_with_nccl_on_one_gpu(tmp_path: Path) -> None:
    """The NCCL path of FSDP2 (one rank is enough to run it), bf16 mixed precision: stopped by
    SIGTERM, resumed, and the consolidated final weights load into the plain model."""
    args = fsdp_args(tmp_path, "gpu", "trainer.precision=bf16", device="cuda")
    extra = {"NCCL_DEBUG": "VERSION", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    run_dir = tmp_path / "gpu"
    out, err = stop_at(start(1, args, FSDP_STEP_SECONDS="0.05", **extra), run_dir, 4)
    step = stopped_step(out, 1)
    resumed = run(1, args, **extra)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "NCCL version" in out + err + resumed.stdout + resumed.stderr
    assert f"at step {step} " in resumed.stdout
    weights = load_weights(run_dir / "final_model.pt")
    assert all(tensor.device == torch.device("cpu") for tensor in weights.values())
    assert weights["net.0.weight"].shape == (64, 20)
