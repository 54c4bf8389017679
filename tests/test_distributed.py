"""The experiment runs unchanged under torchrun: rank 0 alone writes, every rank stops at the
same step on SIGTERM, and a re-run resumes each rank's sampler at its exact position, so the
final weights equal an uninterrupted run's, bit for bit (also with gradient accumulation).

CPU tests run two gloo ranks. On a GPU machine the same tests run NCCL: one rank where one
GPU is lent (two ranks on one GPU is not DDP), two ranks where there are two GPUs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from src.data.resumable_sampler import ResumableSampler
from src.models.template import load_template_config
from src.trainers import distributed
from tests.support.experiment import (
    REPO_ROOT,
    assert_bit_identical,
    assert_same_history,
    experiment_env,
    load_weights,
    run_experiment,
    torchrun_command,
    wait_for_checkpoint,
)

# Per rank: 6554 train samples / 2 ranks = 3277, 52 batches of 64 = 52 steps per epoch, 156
# in all (~2 s on two loaded CPU cores): the stop lands at step 5, far from the end.
WORKLOAD = [
    "data.num_samples=8192",
    "model.hidden_dim=64",
    "trainer.max_epochs=3",
    "trainer.early_stopping_patience=0",
    "trainer.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.every_n_steps=5",
]
STOP_AT_STEP = 5
# Accumulation: half the per-device batch, two micro-batches a step; the same 52 steps an
# epoch, the last one a group of one micro-batch (103 per rank).
VARIANTS = {
    "plain": [],
    "accumulate": ["data.batch_size=32", "trainer.grad_accum_steps=2"],
}
TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"needs 2 GPUs for 2 NCCL ranks (this machine has {torch.cuda.device_count()})",
)


def ddp_args(output_dir: Path, run_name: str, device: str, *extra: str) -> list[str]:
    """The device is explicit: on a GPU box `auto` would put the gloo tests on CUDA."""
    return [
        *WORKLOAD,
        f"trainer.device={device}",
        f"paths.output_dir={output_dir}",
        f"run_name={run_name}",
        *extra,
    ]


def torchrun_env(device: str) -> dict[str, str]:
    if device == "cpu":
        return experiment_env()
    # NCCL_DEBUG=VERSION: NCCL prints its version when a communicator starts, which proves
    # the NCCL backend ran. cuBLAS needs a fixed workspace to be deterministic.
    return experiment_env(NCCL_DEBUG="VERSION", CUBLAS_WORKSPACE_CONFIG=":4096:8")


def run_torchrun(
    ranks: int, args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(ranks, args),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class ReferenceRun:
    run_dir: Path
    stdout: str


@pytest.fixture(scope="module")
def reference_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str, int, str], ReferenceRun]:
    """Uninterrupted runs, made on first use per (device, ranks, variant) and shared: a
    skipped GPU test costs nothing, the CPU tests pay for each reference once."""
    made: dict[tuple[str, int, str], ReferenceRun] = {}

    def get(device: str, ranks: int, variant: str) -> ReferenceRun:
        key = (device, ranks, variant)
        if key not in made:
            output_dir = tmp_path_factory.mktemp(f"reference-{device}-{ranks}-{variant}")
            args = ddp_args(output_dir, "reference", device, *VARIANTS[variant])
            result = run_torchrun(ranks, args, torchrun_env(device))
            assert result.returncode == 0, result.stdout + result.stderr
            made[key] = ReferenceRun(output_dir / "reference", result.stdout)
        return made[key]

    return get


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under ``run_dir``: its content hash and modification time, so a rewrite
    shows even when the bytes come out the same, and the names show files added or removed."""
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        + f":{path.stat().st_mtime_ns}"
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }


# ----- fast checks of the pieces ------------------------------------------------------


def test_every_rank_gets_an_equal_share_even_with_more_ranks_than_samples() -> None:
    """An unequal share makes the rank that runs out first skip a collective: DDP hangs."""
    for size, world_size in ((10, 3), (3, 8), (1, 4)):
        shards = [
            list(ResumableSampler(size, seed=1, rank=rank, world_size=world_size))
            for rank in range(world_size)
        ]
        share = -(-size // world_size)
        assert [len(shard) for shard in shards] == [share] * world_size, (size, world_size)
        assert set(sum(shards, [])) == set(range(size))


def test_torchrun_starts_the_process_group_for_one_rank_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One rank under torchrun runs the same NCCL/gloo and DDP code as eight; plain python
    starts nothing."""
    started: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda backend: started.append(backend)
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    plain = distributed.init_distributed("cpu")
    assert not plain.is_distributed and started == []

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    one_rank = distributed.init_distributed("cpu")
    assert one_rank.is_distributed and one_rank.world_size == 1 and started == ["gloo"]


def test_a_cuda_rank_selects_its_gpu_before_nccl_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU-only path, pinned on the CPU: NCCL and object collectives use the current
    device, so each rank must select GPU LOCAL_RANK before the process group starts."""
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend))
    )
    monkeypatch.setattr(
        distributed.torch.cuda, "set_device", lambda index: calls.append(("set_device", index))
    )
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "3")  # second node, fourth GPU
    info = distributed.init_distributed("cuda")
    assert calls == [("set_device", 3), ("init", "nccl")]
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (11, 3, 16, False)


# ----- real torchrun runs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "ranks", "variant"),
    [
        # On the CPU the accumulate variant alone (it runs the plain DDP path plus no_sync):
        # the suite's time budget; on GPUs both.
        ("cpu", 2, "accumulate"),
        pytest.param("cuda", 1, "plain", marks=pytest.mark.gpu, id="cuda-1-nccl-plain"),
        pytest.param("cuda", 2, "plain", marks=[pytest.mark.gpu, TWO_GPUS]),
        pytest.param("cuda", 2, "accumulate", marks=[pytest.mark.gpu, TWO_GPUS]),
    ],
)
def test_sigterm_to_the_group_then_rerun_is_bit_identical(
    tmp_path: Path,
    reference_run: Callable[[str, int, str], ReferenceRun],
    device: str,
    ranks: int,
    variant: str,
) -> None:
    env = torchrun_env(device)
    args = ddp_args(tmp_path, "ddp", device, *VARIANTS[variant])
    run_dir = tmp_path / "ddp"
    process = subprocess.Popen(
        torchrun_command(ranks, args),
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_checkpoint(process, run_dir, STOP_AT_STEP, timeout=180)
    os.killpg(process.pid, signal.SIGTERM)  # agent and every rank, like Slurm or docker stop
    out, err = process.communicate(timeout=120)
    stopped = re.findall(r"stopped by SIGTERM at step (\d+)", out)
    assert len(stopped) == ranks and len(set(stopped)) == 1, out + err  # one step for all
    step = int(stopped[0])
    assert STOP_AT_STEP <= step < 156, out + err
    assert (run_dir / "checkpoints" / f"step_{step:09d}.json").is_file()
    assert out.count("saved checkpoint at step") == 1  # rank 0 alone writes and says so
    assert not (run_dir / "final_model.pt").exists()

    resumed = run_torchrun(ranks, args, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count(f"resuming from {run_dir / 'checkpoints'}") == 1
    assert resumed.stdout.count(f"at step {step} ") == 1
    test_lines = re.findall(r"test_loss \S+ \| test_acc \S+", resumed.stdout)
    assert len(test_lines) == ranks and len(set(test_lines)) == 1  # every rank agrees
    if device == "cuda":
        assert "NCCL version" in resumed.stdout + resumed.stderr

    reference = reference_run(device, ranks, variant).run_dir
    assert_bit_identical(run_dir / "final_model.pt", reference / "final_model.pt")
    assert_bit_identical(run_dir / "best_model.pt", reference / "best_model.pt")
    assert_same_history(run_dir, reference, ("train_loss", "val_loss"))


def test_a_two_rank_ddp_run_goes_on_with_one_rank(
    tmp_path: Path, reference_run: Callable[[str, int, str], ReferenceRun]
) -> None:
    """Another world size is no longer refused: the data position is global and DDP's
    checkpoint holds the whole model. One line says so and gives the effective batch."""
    shutil.copytree(reference_run("cpu", 2, "plain").run_dir, tmp_path / "reference")
    args = [*ddp_args(tmp_path, "reference", "cpu"), "trainer.max_epochs=4"]
    result = run_experiment(args)  # plain python: 1 rank, one more epoch
    assert result.returncode == 0, result.stdout + result.stderr
    line = (
        "[trainer] world size changed: checkpointed on 2 rank(s), now 1; effective batch 64 "
        "= 64 per device x 1 rank(s) x 1 micro-batch(es) per optimizer step"
    )
    assert result.stdout.splitlines().count(line) == 1, result.stdout
    log = json.loads((tmp_path / "reference" / "training_log.json").read_text())
    assert [record["epoch"] for record in log] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("variant", "per_device", "accumulation"), [("plain", 64, 1), ("accumulate", 32, 2)]
)
def test_effective_batch_is_printed_at_start_and_recorded(
    reference_run: Callable[[str, int, str], ReferenceRun],
    variant: str,
    per_device: int,
    accumulation: int,
) -> None:
    reference = reference_run("cpu", 2, variant)
    effective = per_device * 2 * accumulation
    line = (
        f"[trainer] effective batch {effective} = {per_device} per device x 2 rank(s) x "
        f"{accumulation} micro-batch(es) per optimizer step"
    )
    lines = reference.stdout.splitlines()
    assert lines.count(line) == 1, reference.stdout  # rank 0 alone prints it
    first_epoch = next(i for i, text in enumerate(lines) if text.startswith("[trainer] epoch 1/"))
    assert lines.index(line) < first_epoch  # at start, before any training is reported
    results = json.loads((reference.run_dir / "test_results.json").read_text())
    assert (results["batch_size"], results["effective_batch_size"]) == (per_device, effective)
    for sidecar in (reference.run_dir / "checkpoints").glob("step_*.json"):
        metadata = json.loads(sidecar.read_text())["metadata"]
        assert metadata["effective_batch_size"] == effective
        assert metadata["resume_settings"]["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("device", "ranks"),
    [
        ("cpu", 2),
        pytest.param("cuda", 1, marks=pytest.mark.gpu, id="cuda-1"),
        pytest.param("cuda", 2, marks=[pytest.mark.gpu, TWO_GPUS], id="cuda-2"),
    ],
)
def test_compile_and_ddp_save_plain_state_dicts(tmp_path: Path, device: str, ranks: int) -> None:
    """torch.compile(DDP(model)) trains, and every saved state_dict has the plain model's
    keys (no `module.`, no `_orig_mod.`), loadable without DDP or compiling.

    The real inductor backend (12-30 s on two CPU cores, warm or cold cache; it needs a C
    compiler). Dynamo's DDPOptimizer line, once per rank, proves the compiled module was
    the DDP-wrapped one.
    """
    args = [
        "data.num_samples=2048",
        "model.hidden_dim=64",
        "trainer.max_steps=6",
        "trainer.progress_bar=false",
        "logging.tensorboard=false",
        "trainer.compile=true",
        f"trainer.device={device}",
        f"paths.output_dir={tmp_path}",
        "run_name=compiled",
    ]
    result = run_torchrun(ranks, args, {**torchrun_env(device), "TORCH_LOGS": "ddp"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("DDPOptimizer used bucket cap") == ranks, result.stderr

    from src.config import DEV_CONFIG
    from src.models import build_model

    cfg = load_template_config(DEV_CONFIG, args)
    plain = build_model(cfg.model, cfg.data.num_features, cfg.data.num_classes)
    run_dir = tmp_path / "compiled"
    newest = max((run_dir / "checkpoints").glob("step_*.pt"))
    saved = {
        "checkpoint": torch.load(newest, map_location="cpu", weights_only=True)["model"],
        "best_model.pt": load_weights(run_dir / "best_model.pt"),
        "final_model.pt": load_weights(run_dir / "final_model.pt"),
    }
    for name, state in saved.items():
        assert list(state) == list(plain.state_dict()), name
        plain.load_state_dict(state)  # strict: every key matches the plain module's
