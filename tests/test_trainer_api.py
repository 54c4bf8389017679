"""The open trainer API in-process: regression without accuracy, a max-mode monitor, dict
batches through ``model(**batch)``, extending a finished run, the resume guard inside the
trainer, and the CPU-side logic of code paths that only a GPU takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from src.common.rng import capture_rng_state, restore_rng_state
from src.config import DEV_CONFIG, ConfigError
from src.data.batches import batch_size_of, move_to_device
from src.data.loaders import SeededBatchSampler, make_loader, mix_seed
from src.data.resumable_sampler import ResumableSampler
from src.launch.resume_guard import check_resume_settings
from src.models.template import load_template_config
from src.trainers import distributed
from src.trainers.interruptible_trainer import InterruptibleTrainer, should_load_scaler
from tests.test_trainer import make_trainer


def cfg_for(tmp_path: Path, *overrides: str):
    return load_template_config(
        DEV_CONFIG,
        [f"paths.output_dir={tmp_path}", "trainer.progress_bar=false", *overrides],
    )


def regression_data(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    y = x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(n, generator=generator)
    return TensorDataset(x, y.unsqueeze(1))


def r_squared(model: nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
    x, y = batch
    prediction = model(x)
    loss = F.mse_loss(prediction, y)
    return {"loss": loss, "r2": 1 - loss / y.var(unbiased=False).clamp_min(1e-8)}


def test_regression_with_mse_reports_no_accuracy_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = cfg_for(tmp_path, "run_name=reg", "logging.tensorboard=true", "trainer.max_epochs=2")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    trainer = InterruptibleTrainer(
        cfg, model, regression_data(512, 1), regression_data(128, 2), loss_fn=F.mse_loss
    )
    trainer.fit()
    results = trainer.test(regression_data(128, 3))
    out = capsys.readouterr().out
    run_dir = tmp_path / "reg"
    assert "acc" not in out and "val_loss" in out
    log_text = (run_dir / "training_log.json").read_text()
    assert "accuracy" not in log_text and "val_loss" in log_text
    assert set(k for k in results if k.startswith("test_")) == {"test_loss"}
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "val/loss" in tags and not any("acc" in tag for tag in tags)


def test_max_mode_monitor_picks_the_best_model(tmp_path: Path) -> None:
    cfg = cfg_for(
        tmp_path,
        "run_name=r2",
        "trainer.max_epochs=4",
        "trainer.monitor=val/r2",
        "trainer.monitor_mode=max",
        "optim.lr=0.05",  # big enough that some epoch is worse than an earlier one
        "optim.warmup_steps=0",
        "data.batch_size=32",
    )
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    trainer = InterruptibleTrainer(
        cfg, model, regression_data(256, 1), regression_data(64, 2), step_fn=r_squared
    )
    result = trainer.fit()
    history = trainer.state.history
    r2_values = [record["val_r2"] for record in history]
    best_epoch = max(range(len(r2_values)), key=r2_values.__getitem__)
    assert result.monitor == "val/r2" and result.best_value == max(r2_values)
    assert trainer.state.best_epoch == history[best_epoch]["epoch"]
    best = torch.load(tmp_path / "r2" / "best_model.pt", weights_only=True)
    trainer.model.load_state_dict(best)
    assert trainer.evaluate(regression_data(64, 2))["r2"] == pytest.approx(max(r2_values))


def test_unknown_monitor_names_the_metrics_there_are(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"val/f1.*val/loss, val/accuracy"):
        make_trainer(tmp_path, "run_name=mon", "trainer.monitor=val/f1")
    # Checked when the trainer is built, before config.json or any checkpoint is written.
    assert [p.name for p in (tmp_path / "mon").iterdir()] == [".run.lock"]


class DictDataset(Dataset):
    """Hugging Face-shaped: dict samples, labels inside, the model computes its own loss."""

    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(n))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"features": self.x[index], "labels": (self.x[index].sum() > 0).long()}


class LossReturningModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.linear(features)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_dict_batches_use_the_models_own_loss(tmp_path: Path) -> None:
    cfg = cfg_for(
        tmp_path,
        "run_name=hf",
        "trainer.max_epochs=5",
        "trainer.early_stopping_patience=0",
        "optim.warmup_steps=0",
        "optim.lr=0.05",
        "logging.tensorboard=false",
    )
    torch.manual_seed(0)
    trainer = InterruptibleTrainer(cfg, LossReturningModel(), DictDataset(256), DictDataset(64))
    result = trainer.fit()
    losses = [record["val_loss"] for record in trainer.state.history]
    assert result.status == "completed" and losses[-1] < min(losses[0], 0.5), losses


@pytest.mark.parametrize(
    ("first", "second", "expected_step", "expected_epochs"),
    [
        (["trainer.max_steps=20"], ["trainer.max_steps=40"], 40, 1),  # 26 steps per epoch
        (["trainer.max_epochs=1"], ["trainer.max_epochs=3"], 78, 3),
    ],
)
def test_raising_the_length_of_a_finished_run_trains_the_extra_part(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    first: list[str],
    second: list[str],
    expected_step: int,
    expected_epochs: int,
) -> None:
    common = ["run_name=ext", "trainer.early_stopping_patience=0"]
    done, _ = make_trainer(tmp_path, *common, *first)
    assert done.fit().status == "completed"
    longer, _ = make_trainer(tmp_path, *common, *second)
    result = longer.fit()
    assert "extending the finished run" in capsys.readouterr().out
    assert result.status == "completed" and result.global_step == expected_step
    assert longer.state.epoch == expected_epochs
    history = json.loads((tmp_path / "ext" / "training_log.json").read_text())
    assert history[-1]["step"] == expected_step


def test_max_steps_mid_epoch_keeps_the_position(tmp_path: Path) -> None:
    """20 then 40 steps sees the same batches, in the same order, as 40 at once: the
    weights differ only through the LR schedule, so with a constant LR they are equal."""
    flat_lr = [
        "optim.warmup_steps=0",
        "optim.min_lr_ratio=1.0",
        "trainer.early_stopping_patience=0",
    ]
    once, _ = make_trainer(tmp_path, "run_name=once", "trainer.max_steps=40", *flat_lr)
    once.fit()
    first, _ = make_trainer(tmp_path, "run_name=twice", "trainer.max_steps=20", *flat_lr)
    first.fit()
    assert first.state.epoch == 0 and first.state.batch_in_epoch == 20
    second, _ = make_trainer(tmp_path, "run_name=twice", "trainer.max_steps=40", *flat_lr)
    second.fit()
    for name, tensor in once.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_trainer_built_directly_refuses_changed_settings(tmp_path: Path) -> None:
    """A notebook that skips load_experiment_config still gets the resume guard."""
    first, _ = make_trainer(tmp_path, "run_name=guard", "trainer.max_steps=5")
    first.fit()
    for changed in ("data.batch_size=32", "trainer.grad_accum_steps=2"):
        with pytest.raises(ConfigError, match=changed.split("=")[0]):
            make_trainer(tmp_path, "run_name=guard", "trainer.max_steps=5", changed)
    # Another number of ranks resumes (the data position is global), unless the effective
    # batch it must keep cannot be made with them.
    check_resume_settings(cfg_for(tmp_path, "run_name=guard"), world_size=2)
    cfg = cfg_for(tmp_path, "run_name=guard", "trainer.keep_effective_batch=true")
    with pytest.raises(ConfigError, match=r"cannot keep the effective batch \d+ .* on 2 rank"):
        check_resume_settings(cfg, world_size=2)


# ----- code paths only a GPU takes, pinned on the CPU ----------------------------------


@pytest.mark.parametrize(
    ("saved", "enabled", "expected"),
    [({}, True, False), ({"scale": 1024.0}, True, True), ({"scale": 1024.0}, False, False)],
)
def test_scaler_state_loads_only_when_both_sides_use_one(
    saved: dict, enabled: bool, expected: bool
) -> None:
    assert should_load_scaler(saved, enabled) is expected


def test_resume_loads_the_checkpoint_onto_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = make_trainer(tmp_path, "run_name=cpu-first", "trainer.max_steps=5")
    first.fit()
    resumed, _ = make_trainer(tmp_path, "run_name=cpu-first", "trainer.max_steps=5")
    seen = []
    original = resumed.checkpoints.load_latest

    def spy(map_location="cpu"):
        seen.append(str(map_location))
        return original(map_location=map_location)

    monkeypatch.setattr(resumed.checkpoints, "load_latest", spy)
    assert resumed._resume() == 5 and seen == ["cpu"]


def test_rng_state_with_cuda_entries_restores_on_a_cpu_machine() -> None:
    state = capture_rng_state()
    state["torch_cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as saved on a GPU box
    expected = torch.rand(3)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_each_rank_sets_its_own_cuda_device_before_the_process_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(f"set_device {index}"))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda backend: calls.append(f"init {backend}")
    )
    info = distributed.init_distributed("cuda")
    assert info.local_rank == 1 and calls == ["set_device 1", "init nccl"]
    calls.clear()
    distributed.init_distributed("cpu")
    assert calls == ["init gloo"]


def test_batches_of_any_shape_move_and_count() -> None:
    batch = {"ids": torch.zeros(5, 3), "meta": {"mask": torch.ones(5)}, "name": "x"}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["ids"].device.type == "meta" and moved["meta"]["mask"].device.type == "meta"
    assert moved["name"] == "x" and batch_size_of(batch) == 5
    assert batch_size_of((torch.zeros(7, 2), torch.zeros(7))) == 7
    with pytest.raises(ValueError, match="collate_fn"):
        batch_size_of({"names": ["a", "b"]})


class Noisy(Dataset):
    """Augmentation that draws from torch's RNG inside ``__getitem__``."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(()) + index


def draws(epoch: int, start_index: int = 0, rank: int = 0, global_start: int = 0) -> list[float]:
    sampler = ResumableSampler(8, seed=3, shuffle=False, rank=rank)
    sampler.set_epoch(epoch, start_index, global_start=global_start)
    loader = make_loader(
        Noisy(), sampler, batch_size=2, seed=3, rank=rank, num_workers=2,
        collate_fn=None, pin_memory=False,
    )  # fmt: skip
    return [float(x) for batch in loader for x in batch]


def test_worker_draws_differ_by_epoch_and_come_back_on_resume() -> None:
    epoch0, epoch1 = draws(0), draws(1)
    assert epoch0 != epoch1, "augmentation must not repeat every epoch"
    assert draws(0, start_index=4) == epoch0[4:], "a resumed epoch draws what the original did"
    # The trainer resumes from the samples all ranks consumed (global_start): same draws.
    assert draws(0, global_start=4) == epoch0[4:]
    assert draws(0, rank=1) != epoch0
    seeds = [mix_seed(3, e, r, b) for e in range(3) for r in range(2) for b in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert len(SeededBatchSampler(ResumableSampler(9, 0), 2, 0, 0)) == 5


def test_compiled_training_saves_plain_state_dicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trainer.compile wraps the model for training only: no `_orig_mod.` keys anywhere.

    The eager backend keeps the test fast; the wrapping (OptimizedModule) is the real one.
    """
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))
    trainer, test_set = make_trainer(tmp_path, "run_name=compiled", "trainer.compile=true")
    assert type(trainer.train_model).__name__ == "OptimizedModule"
    trainer.fit()
    run_dir = tmp_path / "compiled"
    checkpoint = torch.load(trainer.checkpoints.latest_path(), weights_only=True)
    for state in (
        checkpoint["model"],
        torch.load(run_dir / "best_model.pt", weights_only=True),
        torch.load(run_dir / "final_model.pt", weights_only=True),
    ):
        assert state and not any(key.startswith("_orig_mod.") for key in state)
    plain, _ = make_trainer(tmp_path, "run_name=plain-load")
    plain.model.load_state_dict(torch.load(run_dir / "best_model.pt", weights_only=True))


def test_own_settings_need_their_own_config_files() -> None:
    from dataclasses import dataclass

    from src.launch import load_experiment_config

    @dataclass
    class MyModel:
        width: int = 8

    with pytest.raises(TypeError, match="pass dev_config= and prod_config="):
        load_experiment_config([], model=MyModel, dev_config="configs/x.yaml")
