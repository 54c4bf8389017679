"""InterruptibleTrainer features, in-process on tiny data (the kill tests are in test_resume.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.common.paths import REPO_ROOT
from src.common.rng import seed_everything
from src.common.signals import EXIT_INTERRUPTED, exit_after_stop
from src.config import DEV_CONFIG
from src.data.resumable_sampler import ResumableSampler
from src.data.synthetic import make_classification, split
from src.models import build_model
from src.models.template import load_template_config
from src.trainers.interruptible_trainer import InterruptibleTrainer, lr_factor


def make_trainer(tmp_path: Path, *overrides: str) -> tuple[InterruptibleTrainer, object]:
    cfg = load_template_config(
        DEV_CONFIG,
        [
            f"paths.output_dir={tmp_path}",
            "trainer.progress_bar=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )
    data = make_classification(
        cfg.data.num_samples, cfg.data.num_features, cfg.data.num_classes, cfg.data.noise, 0
    )
    train_set, val_set, test_set = split(data, cfg.data.val_fraction, cfg.data.test_fraction, 0)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.data.num_features, cfg.data.num_classes)
    return InterruptibleTrainer(cfg, model, train_set, val_set), test_set


def test_fit_writes_outputs_and_test_results(tmp_path: Path) -> None:
    trainer, test_set = make_trainer(tmp_path, "run_name=basic")
    result = trainer.fit()
    assert result.status in {"completed", "early_stopped"} and not result.interrupted
    results = trainer.test(test_set)
    assert results["test_accuracy"] > 0.5  # the task is learnable
    on_disk = json.loads((tmp_path / "basic" / "test_results.json").read_text())
    assert on_disk["test_loss"] == pytest.approx(results["test_loss"])


def test_rerun_of_finished_run_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first, _ = make_trainer(tmp_path, "run_name=again")
    first.fit()
    weights = torch.load(tmp_path / "again" / "final_model.pt")
    second, _ = make_trainer(tmp_path, "run_name=again")
    capsys.readouterr()
    result = second.fit()
    assert result.global_step == first.state.global_step
    out = capsys.readouterr().out
    assert "run 'again' already finished" in out and "nothing to train" in out
    assert "resuming from" not in out
    for name, tensor in torch.load(tmp_path / "again" / "final_model.pt").items():
        assert torch.equal(tensor, weights[name])


def test_max_steps_stops_mid_epoch(tmp_path: Path) -> None:
    trainer, _ = make_trainer(tmp_path, "run_name=short", "trainer.max_steps=7")
    result = trainer.fit()
    assert result.global_step == 7 and result.status == "completed"
    assert len(trainer.state.history) == 1


def test_grad_accumulation_matches_a_bigger_batch(tmp_path: Path) -> None:
    """Two micro-batches of 32 accumulate to the same update as one batch of 64."""
    common = ["trainer.max_steps=5", "model.dropout=0.0", "trainer.grad_clip_norm=0"]
    big, _ = make_trainer(tmp_path, "run_name=big", "data.batch_size=64", *common)
    big.fit()
    accum, _ = make_trainer(
        tmp_path, "run_name=acc", "data.batch_size=32", "trainer.grad_accum_steps=2", *common
    )
    accum.fit()
    assert accum.steps_per_epoch == big.steps_per_epoch
    accum_weights = accum.model.state_dict()
    for name, tensor in big.model.state_dict().items():
        assert torch.allclose(tensor, accum_weights[name], atol=1e-5), name


def test_early_stopping_on_val_loss(tmp_path: Path) -> None:
    # A huge min_delta means no epoch counts as an improvement after the first.
    trainer, _ = make_trainer(
        tmp_path,
        "run_name=early",
        "trainer.max_epochs=10",
        "trainer.early_stopping_patience=2",
        "trainer.early_stopping_min_delta=100",
    )
    result = trainer.fit()
    assert result.status == "early_stopped"
    assert trainer.state.epoch == 3 and trainer.state.best_epoch == 0
    assert (tmp_path / "early" / "best_model.pt").is_file()


def test_mixed_precision_on_cpu_falls_back_to_fp32(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trainer, _ = make_trainer(tmp_path, "run_name=amp", "trainer.precision=bf16")
    assert trainer.precision == "fp32"
    assert "precision bf16 needs CUDA" in capsys.readouterr().out


def test_signal_inside_fit_stops_at_a_step_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler only sets a flag; fit() returns 'interrupted' with a checkpoint on disk."""
    # As in a script, whatever ran earlier in this worker: no kernel loaded (a kernel keeps
    # its own handlers after a stop), no after-training handler left by an earlier fit.
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    trainer, _ = make_trainer(tmp_path, "run_name=sig", "trainer.log_every_n_steps=1")
    original_step = trainer._optimizer_step

    def step_then_signal() -> None:
        original_step()
        if trainer.state.global_step == 13:
            os.kill(os.getpid(), signal.SIGUSR1)  # the configured extra (Slurm) signal

    trainer._optimizer_step = step_then_signal
    result = trainer.fit()
    assert result.interrupted and result.signal_name == "SIGUSR1"
    assert result.global_step == 13
    assert trainer.checkpoints.latest_path().name == "step_000000013.pt"
    # After a stop a duplicate of the signal ends the process with 75 (see below).
    assert signal.getsignal(signal.SIGUSR1) is exit_after_stop
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # this pytest process goes on
        signal.signal(sig, signal.SIG_DFL)


def test_a_signal_in_the_last_validation_batch_stops_on_the_epoch_checkpoint_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A notice that lands in the epoch's last validation batch (after every check of the
    validation and of the steps): the epoch-end checkpoint is the stop's, and the same
    "re-run to resume" line is printed (the Slurm time-limit test once caught it missing)."""
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    trainer, _ = make_trainer(tmp_path, "run_name=evalsig")
    last_batch = len(trainer._eval_loader(trainer.val_set))
    evaluated = []
    plain_eval = trainer.eval_fn

    def eval_then_signal(model: torch.nn.Module, batch: object) -> object:
        evaluated.append(len(evaluated))
        if len(evaluated) == last_batch:
            os.kill(os.getpid(), signal.SIGUSR1)
        return plain_eval(model, batch)

    trainer.eval_fn = eval_then_signal
    result = trainer.fit()
    steps_per_epoch = trainer.state.global_step
    assert result.interrupted and trainer.state.epoch == 1 and not trainer.state.eval_pending
    assert trainer.checkpoints.latest_path().name == f"step_{steps_per_epoch:09d}.pt"
    out = capsys.readouterr().out
    assert f"saved checkpoint at step {steps_per_epoch}; re-run to resume" in out
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def test_a_stop_during_validation_saves_the_epoch_at_once_and_the_resume_validates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The signal lands at the second of the epoch's validation batches: the rest of the
    validation is not waited for, the trained epoch is saved, and the re-run validates it
    first, then ends exactly where an uninterrupted run ends."""
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    reference, _ = make_trainer(tmp_path, "run_name=reference")
    reference.fit()
    trainer, _ = make_trainer(tmp_path, "run_name=cut")
    evaluated = []
    plain_eval = trainer.eval_fn

    def eval_then_signal(model: torch.nn.Module, batch: object) -> object:
        evaluated.append(len(evaluated))
        if len(evaluated) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return plain_eval(model, batch)

    trainer.eval_fn = eval_then_signal
    result = trainer.fit()
    steps_per_epoch = result.global_step
    assert result.interrupted and trainer.state.epoch == 0 and trainer.state.eval_pending
    assert len(evaluated) == 2 < len(trainer._eval_loader(trainer.val_set))  # not waited for
    assert trainer.checkpoints.latest_path().name == f"step_{steps_per_epoch:09d}.pt"
    out = capsys.readouterr().out
    assert "validation of epoch 1 cut short by the stop" in out
    assert f"saved checkpoint at step {steps_per_epoch}; re-run to resume" in out
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)

    resumed, _ = make_trainer(tmp_path, "run_name=cut")
    assert resumed.fit().status == "completed"
    assert "epoch 1 is trained; validating it first" in capsys.readouterr().out

    def records(trainer: InterruptibleTrainer) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in trainer.state.history]

    assert records(resumed) == records(reference)  # every epoch validated once, the same
    expected = reference.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_sampler_resumes_mid_epoch_and_shards_by_rank() -> None:
    full = ResumableSampler(100, seed=5)
    full.set_epoch(3)
    order = list(full)
    resumed = ResumableSampler(100, seed=5)
    resumed.set_epoch(3, start_index=40)
    assert list(resumed) == order[40:] and len(resumed) == 60
    other_epoch = ResumableSampler(100, seed=5)
    other_epoch.set_epoch(4)
    assert list(other_epoch) != order
    shards = [ResumableSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    indices = [list(s) for s in shards]
    assert all(len(i) == 4 for i in indices)  # padded to equal shares
    assert set(sum(indices, [])) == set(range(10))


def test_lr_schedule_is_a_pure_function_of_the_step() -> None:
    assert lr_factor(0, warmup_steps=10, total_steps=100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_on_cuda(tmp_path: Path, precision: str) -> None:
    """Stop mid-run; the resumed trainer gets the grad scaler and the CUDA RNG back."""
    args = ("run_name=cuda", f"trainer.precision={precision}", "trainer.device=cuda")
    trainer, _ = make_trainer(tmp_path, *args)
    assert trainer.device.type == "cuda"
    original_step = trainer._optimizer_step

    def step_then_signal() -> None:
        original_step()
        if trainer.state.global_step == 20:
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer._optimizer_step = step_then_signal
    assert trainer.fit().interrupted
    saved = torch.load(trainer.checkpoints.latest_path(), weights_only=True)
    assert saved["trainer"]["global_step"] == 20 and "torch_cuda" in saved["rng"][0]
    if precision == "fp16":
        assert saved["scaler"]["scale"] > 0  # a live scaler, not an empty state

    resumed, test_set = make_trainer(tmp_path, *args)
    assert resumed._resume() == 20
    assert resumed.scaler.state_dict() == saved["scaler"]
    assert torch.equal(torch.cuda.get_rng_state(), saved["rng"][0]["torch_cuda"][0].cpu())
    finished, _ = make_trainer(tmp_path, *args)
    result = finished.fit()
    assert result.status in {"completed", "early_stopped"} and result.global_step > 20
    assert finished.test(test_set)["test_accuracy"] > 0.5


def test_epoch_line_shows_cost_when_the_hourly_rate_is_known(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trainer, _ = make_trainer(tmp_path, "run_name=cost", "cost.hourly_rate_usd=3600.0")
    trainer.fit()
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("[trainer] epoch ")]
    assert len(epoch_lines) == trainer.state.epoch
    assert all(" | cost $" in line for line in epoch_lines)


def test_gpu_stats_reach_tensorboard_and_the_epoch_line_and_warn_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The trainer's GPU path on CPU: the stand-in NVML module plays GPU 0 at 5% utilization,
    and the trainer is told its device is that GPU (the only part a CPU cannot provide)."""
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import src.trainers.progress as progress_module
    from tests.support.nvml_state import FAKE_NVML_DIR, gpu, write_state

    state = tmp_path / "nvml.json"
    write_state(state, [gpu(util=5, used=12.5e9)])
    monkeypatch.setenv("FAKE_NVML_STATE", str(state))
    monkeypatch.syspath_prepend(str(FAKE_NVML_DIR))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setattr(progress_module, "cuda_index", lambda device: 0)
    trainer, _ = make_trainer(
        tmp_path,
        "run_name=gpu-stats",
        "logging.tensorboard=true",
        "logging.low_gpu_util_minutes=0.0001",  # 6 ms: the second reading in training warns
        "trainer.log_every_n_steps=1",
    )
    original_step = trainer.step_fn

    def slow_step(model, batch):  # ~2.5 s of training: the 1 Hz sampler reads a few times
        time.sleep(0.03)
        return original_step(model, batch)

    trainer.step_fn = slow_step
    trainer.fit()
    out = capsys.readouterr().out
    assert out.count("warning: GPU 0 utilization has stayed under 30%") == 1, out
    assert "data.num_workers" in out and "trainer.compile=true" in out
    epoch_lines = [line for line in out.splitlines() if line.startswith("[trainer] epoch ")]
    assert epoch_lines and all("| gpu 5% 12.5/85.0 GB" in line for line in epoch_lines)
    events = EventAccumulator(str(tmp_path / "gpu-stats" / "tensorboard"))
    events.Reload()
    util = [event.value for event in events.Scalars("gpu/utilization_percent")]
    assert util and set(util) == {5.0}
    assert {event.value for event in events.Scalars("gpu/memory_used_gb")} == {12.5}
    assert trainer.gpu_sampler is not None and trainer.gpu_sampler._thread is None  # stopped


def test_after_a_stop_a_duplicate_signal_ends_the_process_with_75() -> None:
    """scancel signals every process of a job and the batch script passes the signal on too:
    once the stop is saved, a late duplicate must not turn exit 75 into death by signal."""
    script = """if True:
        import os, signal
        from src.common.signals import StopRequest
        untouched = StopRequest([signal.SIGUSR1]).install()
        untouched.restore()  # no stop: the previous handler comes back
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        stop = StopRequest([signal.SIGUSR1, signal.SIGINT]).install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C as ever
        print("saved", flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)  # the duplicate, after the save
        print("not reached")
    """
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EXIT_INTERRUPTED, result.stderr
    assert result.stdout == "saved\n" and result.stderr.count("SIGUSR1 received") == 1
