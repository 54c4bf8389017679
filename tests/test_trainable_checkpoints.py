"""The pieces under LoRA fine-tuning, on plain PyTorch models (no transformers): what a
partly frozen model's checkpoint holds, the frozen base's identity, placement of models
their loader placed, gradient checkpointing's switch, the GPU group sampler, and a frozen
backbone trained, resumed and refused on a changed base through the trainer in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from src.checkpoints import TorchFileFormat, TrainableOnlyFormat, format_for_model
from src.checkpoints.frozen_base import (
    describe_difference,
    frozen_base_identity,
    tensor_fingerprint,
)
from src.checkpoints.trainable import (
    has_frozen_parameters,
    load_trainable_state,
    trainable_state_dict,
)
from src.common.atomic_io import atomic_write_dir
from src.common.errors import ConfigError
from src.models.template import load_template_config
from src.telemetry.nvml import GpuStats
from src.telemetry.sampler import GpuSampler, GpuSamplerGroup
from src.trainers.interruptible_trainer import InterruptibleTrainer
from src.trainers.placement import enable_gradient_checkpointing, place_model


class QuantState(nn.Module):
    """A frozen weight with state saved under its own name, as bitsandbytes' 4-bit has."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8), requires_grad=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight.absmax"] = torch.ones(2)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)  # buffers that change even in a frozen part
        self.quantized = QuantState()
        self.head = nn.Linear(16, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.frozen(x))))


def test_trainable_state_holds_what_trains_and_the_buffers() -> None:
    model = Backbone()
    state = trainable_state_dict(model)
    assert set(state) == {
        "head.weight",
        "head.bias",
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }
    assert has_frozen_parameters(model) and not has_frozen_parameters(nn.Linear(2, 2))
    fresh = Backbone()
    with torch.no_grad():
        fresh.head.weight.add_(1.0)
    load_trainable_state(fresh, state)
    assert torch.equal(fresh.head.weight, model.head.weight)


def test_loading_refuses_keys_that_do_not_fit() -> None:
    state = trainable_state_dict(Backbone())
    with pytest.raises(ValueError, match="does not have"):
        load_trainable_state(Backbone(), {**state, "extra.weight": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "head.weight"}
    with pytest.raises(ValueError, match="lacks 'head.weight', which trains"):
        load_trainable_state(Backbone(), missing)


def test_fingerprint_sees_one_changed_element_and_ignores_the_addition_order() -> None:
    weight = torch.randn(300, 70)
    before = tensor_fingerprint(weight)
    assert tensor_fingerprint(weight.clone()) == before
    assert tensor_fingerprint(weight.t().contiguous().t()) == before  # another memory layout
    changed = weight.clone()
    changed[123, 45] = torch.nextafter(changed[123, 45], torch.tensor(10.0))  # one ulp
    assert tensor_fingerprint(changed) != before
    for dtype in (torch.bfloat16, torch.float16, torch.uint8, torch.bool):
        assert tensor_fingerprint(weight.to(dtype)) == tensor_fingerprint(weight.to(dtype))


def test_identity_names_what_differs() -> None:
    model = Backbone()
    saved = frozen_base_identity(model)
    assert set(saved["fingerprints"]) == {"frozen.weight", "frozen.bias", "quantized.weight"}
    assert describe_difference(saved, frozen_base_identity(Backbone())) is None
    with torch.no_grad():
        model.frozen.bias[2] += 1e-4
    assert "frozen weight 'frozen.bias' changed" in describe_difference(
        saved, frozen_base_identity(model)
    )
    other = {**saved, "name_or_path": "org/other", "revision": "abc"}
    assert "base model None then, 'org/other' now" in describe_difference(saved, other)
    quantized = {**saved, "quantization": {"load_in_4bit": True}}
    assert describe_difference(saved, quantized).startswith("quantization None then")
    assert isinstance(format_for_model(model), TrainableOnlyFormat)
    assert isinstance(format_for_model(nn.Linear(2, 2)), TorchFileFormat)


class DeviceMapped(nn.Module):
    """What from_pretrained(device_map=...) or a 4-bit load leaves: moving must not happen."""

    def __init__(self, **flags: object) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 2)
        for name, value in flags.items():
            setattr(self, name, value)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def to(self, *args: object, **kwargs: object) -> nn.Module:
        raise AssertionError("a model its loader placed was moved")


def test_placed_models_stay_and_batches_go_to_the_input_embeddings() -> None:
    spread = DeviceMapped(hf_device_map={"embed": "cpu", "out": 1})
    placement = place_model(spread, torch.device("cuda", 0))
    assert placement.input_device == torch.device("cpu")
    assert "device_map over 1, cpu" in placement.kept_by
    quantized = place_model(DeviceMapped(is_loaded_in_4bit=True), torch.device("cuda"))
    assert quantized.kept_by == "quantized to 4-bit"
    with pytest.raises(ConfigError, match="cannot run under torchrun"):
        place_model(DeviceMapped(is_loaded_in_8bit=True), torch.device("cpu"), world_size=2)
    plain = nn.Linear(2, 2)
    assert place_model(plain, torch.device("cpu")).devices == (torch.device("cpu"),)


def test_gradient_checkpointing_switch() -> None:
    calls = []

    class Supports(nn.Linear):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict) -> None:
            calls.append(gradient_checkpointing_kwargs)

    enable_gradient_checkpointing(Supports(2, 2))
    assert calls == [{"use_reentrant": False}]
    with pytest.raises(ConfigError, match="Linear has none"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


def test_group_sampler_reports_every_gpu() -> None:
    samplers = [GpuSampler(0), GpuSampler(1)]
    for sampler, util, used in zip(samplers, (90.0, 30.0), (10.0, 20.0), strict=True):
        sampler.record(GpuStats(0, "H100", util, used, 80.0, None, 300.0, None))
    group = GpuSamplerGroup(samplers)
    metrics = group.metrics()
    assert metrics["gpu/utilization_percent"] == 60.0
    assert metrics["gpu/memory_used_gb"] == 30.0
    assert metrics["gpu1/utilization_percent"] == 30.0 and metrics["gpu0/memory_used_gb"] == 10.0
    assert group.summary().startswith("0: gpu 90% 10.0/80.0 GB | 1: gpu 30%")


def test_atomic_write_dir_replaces_whole_and_recovers_a_killed_swap(tmp_path: Path) -> None:
    target = tmp_path / "best_adapter"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("one"))
    atomic_write_dir(target, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    target.rename(tmp_path / ".best_adapter.old")  # killed between the two renames

    def fail(directory: Path) -> None:
        raise OSError("disk error")

    with pytest.raises(OSError, match="disk error"):
        atomic_write_dir(target, fail)
    assert (target / "b.txt").read_text() == "two"  # the old folder came back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_adapter"]


def frozen_cfg(tmp_path: Path, max_epochs: int = 2) -> object:
    return load_template_config(
        None,
        [
            f"paths.output_dir={tmp_path}",
            "run_name=frozen",
            "data.batch_size=16",
            f"trainer.max_epochs={max_epochs}",
            "trainer.progress_bar=false",
            "checkpoint.every_n_steps=2",
            "logging.tensorboard=false",
        ],
    )


def frozen_data() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])


def test_a_frozen_backbone_trains_checkpoints_small_and_refuses_another_base(
    tmp_path: Path,
) -> None:
    train_set, val_set = frozen_data()
    cfg = frozen_cfg(tmp_path)
    model = Backbone()
    frozen_before = model.frozen.weight.clone()
    result = InterruptibleTrainer(cfg, model, train_set, val_set).fit()
    assert result.global_step == 6
    assert torch.equal(model.frozen.weight, frozen_before)
    run_dir = tmp_path / "frozen"
    newest = max((run_dir / "checkpoints").glob("step_*.pt"))
    saved = torch.load(newest, weights_only=True)
    assert saved["model_scope"] == "trainable" and "frozen.weight" not in saved["model"]
    sidecar = json.loads(newest.with_suffix(".json").read_text())
    assert sidecar["metadata"]["frozen_base"]["tensors"] == 3
    full = torch.load(run_dir / "best_model.pt", weights_only=True)  # a plain model's: all of it
    assert torch.equal(full["frozen.weight"], frozen_before)

    # More epochs on the same base resume; on a changed one they are refused before anything.
    longer = frozen_cfg(tmp_path, 3)
    again = InterruptibleTrainer(longer, Backbone(), train_set, val_set).fit()
    assert again.global_step == 9
    changed = Backbone()
    with torch.no_grad():
        changed.frozen.weight[0, 0] += 1.0
    files_before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="frozen weight 'frozen.weight' changed"):
        InterruptibleTrainer(frozen_cfg(tmp_path, 4), changed, train_set, val_set)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == files_before
    unfrozen = Backbone().requires_grad_(True)
    with pytest.raises(ConfigError, match="nothing of the model built now is frozen"):
        InterruptibleTrainer(frozen_cfg(tmp_path, 4), unfrozen, train_set, val_set)
