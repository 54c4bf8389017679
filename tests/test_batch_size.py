"""The batch-size finder: the search on a fake "fits up to N" model, the trainer's
``data.batch_size: auto`` path on CPU (the GPU measurement stood in), the real one on a GPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import src.trainers.batch_size as batch_size_module
from src.config import ConfigError
from src.trainers.batch_size import (
    BatchSearch,
    BatchSizeError,
    find_max_batch_size,
    is_out_of_memory,
    search_batch_size,
)
from tests.support.experiment import run_experiment
from tests.test_trainer import make_trainer


def fits_up_to(limit: int, calls: list[int]):
    def fits(size: int) -> bool:
        calls.append(size)
        return size <= limit

    return fits


@pytest.mark.parametrize("largest", [1, 2, 3, 64, 100, 1000, 4097])
def test_search_finds_the_largest_fitting_size_then_keeps_a_margin(largest: int) -> None:
    calls: list[int] = []
    search = search_batch_size(fits_up_to(largest, calls), margin=0.1)
    assert search.largest_fitting == largest
    assert search.chosen == max(1, int(largest * 0.9))
    # doubling then bisection: about 2 * log2(largest) tries, never the same size twice
    assert len(calls) == len(set(calls)) <= 2 * math.ceil(math.log2(largest + 1)) + 2
    assert [size for size, ok in search.tried] == calls


def test_search_respects_the_data_set_size_and_fails_clearly() -> None:
    calls: list[int] = []
    search = search_batch_size(fits_up_to(10_000, calls), limit=300, margin=0.0)
    assert search.largest_fitting == 300 and max(calls) == 300  # no batch beyond the data
    with pytest.raises(BatchSizeError, match="even a batch of 1 does not fit"):
        search_batch_size(fits_up_to(0, []))


def test_out_of_memory_is_recognised() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_finder_needs_cuda() -> None:
    data = TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(BatchSizeError, match="needs CUDA; this run is on cpu"):
        find_max_batch_size(nn.Linear(4, 2), data, lambda m, b: m(b[0]).sum(), torch.device("cpu"))


def test_auto_on_cpu_is_one_line_exit_2_and_nothing_written(tmp_path: Path) -> None:
    args = [f"paths.output_dir={tmp_path}", "run_name=auto", "data.batch_size=auto"]
    result = run_experiment([*args, "trainer.device=cpu"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "data.batch_size=auto measures GPU memory and needs CUDA" in result.stderr
    assert not (tmp_path / "auto").exists()


def test_bad_batch_size_value_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='an integer >= 1 or "auto"'):
        make_trainer(tmp_path, "data.batch_size=big")


def test_auto_size_is_recorded_and_reused_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The trainer's side, on CPU: the measured size drives the epoch and lands in every
    checkpoint; a resumed run reads it back instead of measuring again."""
    searches: list[int] = []

    def measured(model, dataset, step, device, *, limit, **kwargs) -> BatchSearch:
        searches.append(limit)
        batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
        step(model, batch).backward()  # the trainer's step function works on a real batch
        model.zero_grad(set_to_none=True)
        return BatchSearch(largest_fitting=40, chosen=36, tried=[(40, True)])

    monkeypatch.setattr(batch_size_module, "find_max_batch_size", measured)
    args = ("run_name=auto", "data.batch_size=auto", "trainer.max_steps=12")
    first, _ = make_trainer(tmp_path, *args)
    assert first.batch_size == 36 and searches == [len(first.train_set)]
    assert first.batches_per_epoch == math.ceil(len(first.train_set) / 36)
    first.fit()
    sidecars = sorted((tmp_path / "auto" / "checkpoints").glob("step_*.json"))
    assert sidecars and all(
        json.loads(p.read_text())["metadata"]["batch_size"] == 36 for p in sidecars
    )

    def must_not_measure(*args, **kwargs):
        raise AssertionError("a resumed run measured the batch size again")

    monkeypatch.setattr(batch_size_module, "find_max_batch_size", must_not_measure)
    capsys.readouterr()
    resumed, _ = make_trainer(
        tmp_path, "run_name=auto", "data.batch_size=auto", "trainer.max_steps=20"
    )
    assert resumed.batch_size == 36
    assert "data.batch_size=auto: 36, as this run recorded" in capsys.readouterr().out
    assert resumed.fit().global_step == 20


@pytest.mark.gpu
def test_finder_on_a_real_gpu_runs_out_of_memory_and_recovers() -> None:
    device = torch.device("cuda")
    # Small inputs, wide activations (~1 MB per sample): out of memory at ~10^5 samples,
    # while each CPU-side batch stays small.
    model = nn.Sequential(nn.Linear(64, 65536), nn.ReLU(), nn.Linear(65536, 1)).to(device)
    data = TensorDataset(torch.randn(64, 64))
    free_before = torch.cuda.mem_get_info()[0]
    search = find_max_batch_size(model, data, lambda m, b: m(b[0]).square().mean(), device)
    assert any(not ok for _, ok in search.tried), "the search never ran out of memory"
    assert 1 <= search.chosen < search.largest_fitting
    # The chosen size trains, and the failed tries left no memory behind.
    batch = torch.randn(search.chosen, 64, device=device)
    model(batch).square().mean().backward()
    del batch
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    assert torch.cuda.mem_get_info()[0] > 0.9 * free_before
