"""The char LM's parts: vocabulary, data, padding, the model, its step and its optimizer."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from src.data.char_text import (
    IGNORE_INDEX,
    PAD_ID,
    CharTextDataConfig,
    CharVocab,
    build_char_datasets,
    pad_batch,
)
from src.models.char_gpt import CharGPT, CharGPTConfig, lm_step, make_optimizer
from tests.support.experiment import (
    assert_bit_identical,
    interrupt_at_step,
    newest_checkpoint_step,
    run_experiment,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAR_LM = REPO_ROOT / "experiments" / "char_lm_experiment.py"
SPLITS = ("train", "val", "test")
TINY = CharGPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16)


def write_corpus(root: Path) -> None:
    """Distinct paragraphs in a few files, so tests don't depend on the repo's text."""
    (root / "docs").mkdir()
    for name in ("b.md", "a.md", "docs/c.md"):
        tag = Path(name).stem
        paragraphs = [f"<{tag}{i}> " + "the quick fox " * (i % 4 + 1) for i in range(20)]
        (root / name).write_text("\n\n".join(paragraphs) + "\n")
    (root / "skip.txt").write_text("not matched\n")


def tiny_data(root: Path, seed: int = 1234):
    data_cfg = CharTextDataConfig(patterns=["*.md", "docs/**/*.md"], max_chars=10_000, seed=seed)
    return build_char_datasets(data_cfg, TINY.block_size, root=root)


def test_vocab_round_trip_and_padding_id() -> None:
    vocab = CharVocab.from_text("hello, world\n")
    assert len(vocab) == len(set("hello, world\n")) + 1  # + the padding id
    ids = vocab.encode("world\n")
    assert PAD_ID not in ids
    assert vocab.decode(ids) == "world\n"
    assert vocab.decode(torch.tensor([PAD_ID, *ids, PAD_ID])) == "world\n"
    assert vocab.chars == sorted(vocab.chars)
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        vocab.encode("z")


def test_pad_batch_pads_to_the_longest() -> None:
    samples = [
        {"input_ids": torch.tensor([1, 2, 3]), "targets": torch.tensor([2, 3, 4])},
        {"input_ids": torch.tensor([5]), "targets": torch.tensor([6])},
    ]
    batch = pad_batch(samples)
    assert batch["input_ids"].shape == batch["targets"].shape == (2, 3)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, PAD_ID, PAD_ID]]
    assert batch["targets"].tolist() == [[2, 3, 4], [6, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["lengths"].tolist() == [3, 1]
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.long


def test_dataset_is_deterministic_and_splits_are_disjoint(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    first, second = tiny_data(tmp_path), tiny_data(tmp_path)
    assert [path.name for path in first.files] == ["a.md", "b.md", "c.md"]  # sorted, no .txt
    for name in SPLITS:
        assert getattr(first, name).texts == getattr(second, name).texts
    assert first.vocab.chars == second.vocab.chars
    # Whole paragraphs go to one split: each paragraph's <tag> is in exactly one of them.
    tags = {name: re.findall(r"<\w+>", "".join(getattr(first, name).texts)) for name in SPLITS}
    assert sum(len(found) for found in tags.values()) == 60
    assert len(set().union(*tags.values())) == 60
    assert tiny_data(tmp_path, seed=7).train.texts != first.train.texts  # the seed picks the split


def test_samples_are_shifted_and_fit_the_block(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    data = tiny_data(tmp_path)
    lengths = set()
    for index in range(len(data.train)):
        sample = data.train[index]
        inputs, targets = sample["input_ids"], sample["targets"]
        assert len(inputs) == len(targets) <= TINY.block_size
        assert torch.equal(inputs[1:], targets[:-1])
        assert data.vocab.decode(torch.cat([inputs, targets[-1:]])) == data.train.texts[index]
        lengths.add(len(inputs))
    assert len(lengths) > 1, "samples should have different lengths"


def test_repo_corpus_follows_the_dev_config() -> None:
    data_section = OmegaConf.load(REPO_ROOT / "configs" / "char_lm_dev.yaml").data
    data_cfg = CharTextDataConfig(**data_section)
    data = build_char_datasets(data_cfg, block_size=64)
    assert data.num_chars == data_cfg.max_chars  # the repo has more text than the cap
    assert data.files == sorted(data.files, key=lambda p: p.relative_to(REPO_ROOT).as_posix())
    assert min(len(data.train), len(data.val), len(data.test)) > 0


def test_changing_a_later_token_leaves_earlier_logits_alone() -> None:
    torch.manual_seed(0)
    model = CharGPT(TINY, vocab_size=20).eval()
    ids = torch.randint(1, 20, (2, 12))
    changed = ids.clone()
    changed[:, 8] = (ids[:, 8] % 19) + 1
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert before.shape == (2, 12, 20)
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_generate_length_and_determinism() -> None:
    torch.manual_seed(0)
    model = CharGPT(TINY, vocab_size=20).train()
    prompt = torch.tensor([3, 4, 5])
    outputs = [
        model.generate(prompt, 30, top_k=5, generator=torch.Generator().manual_seed(1))
        for _ in range(2)
    ]
    assert outputs[0].shape == (33,)  # longer than block_size: the context is cropped
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0][:3], prompt)
    assert PAD_ID not in outputs[0][3:].tolist()
    assert model.training, "generate restores the training mode"
    batched = model.generate(prompt.repeat(2, 1), 4, generator=torch.Generator().manual_seed(1))
    assert batched.shape == (2, 7)


def test_padding_does_not_change_the_loss() -> None:
    torch.manual_seed(0)
    model = CharGPT(TINY, vocab_size=20).eval()
    long = {"input_ids": torch.randint(1, 20, (10,)), "targets": torch.randint(1, 20, (10,))}
    short = {"input_ids": torch.randint(1, 20, (4,)), "targets": torch.randint(1, 20, (4,))}
    with torch.no_grad():
        together = lm_step(model, pad_batch([long, short]))
        alone = [lm_step(model, pad_batch([sample]))["loss"] for sample in (long, short)]
    expected = (alone[0] * 10 + alone[1] * 4) / 14  # mean over real tokens only
    torch.testing.assert_close(together["loss"], expected)
    torch.testing.assert_close(together["perplexity"], together["loss"].exp())


def test_optimizer_groups_cover_every_parameter_once() -> None:
    model = CharGPT(TINY, vocab_size=20)
    optimizer = make_optimizer(model, SimpleNamespace(lr=1e-3, weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # tied head: once
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name, param in model.named_parameters():
        is_norm_or_bias = name.endswith("bias") or ".ln_" in name or name.startswith("ln_f")
        assert (id(param) in no_decay_ids) == is_norm_or_bias, name


def test_a_few_steps_lower_the_loss(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    data = tiny_data(tmp_path)
    torch.manual_seed(0)
    model = CharGPT(TINY, vocab_size=len(data.vocab))
    optimizer = make_optimizer(model, SimpleNamespace(lr=1e-2, weight_decay=0.0))
    batch = pad_batch([data.train[i] for i in range(16)])
    losses = []
    for _ in range(20):
        loss = lm_step(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd: 30, expected a multiple of n_head=4"),
        ({"n_layer": 0}, "n_layer: 0, expected an integer >= 1"),
        ({"dropout": 1.0}, "dropout: 1.0, expected a number in"),
    ],
)
def test_bad_model_settings_raise(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CharGPTConfig(**settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"patterns": []}, "patterns: \\[\\], expected at least one glob"),
        ({"max_chars": 0}, "max_chars: 0, expected an integer >= 1"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val \\+ test < 1"),
    ],
)
def test_bad_data_settings_raise(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CharTextDataConfig(**settings)


def test_model_settings_in_both_configs_are_valid() -> None:
    for name in ("char_lm_dev.yaml", "char_lm_prod.yaml"):
        sections = OmegaConf.load(REPO_ROOT / "configs" / name)
        CharGPTConfig(**sections.model)
        CharTextDataConfig(**sections.data)


def test_bad_setting_from_the_command_line_names_the_key(tmp_path: Path) -> None:
    """The experiment's own schema is checked like the built-in sections: one line, exit 2."""
    result = run_experiment(
        [f"paths.output_dir={tmp_path}", "model.n_head=5"], experiment=CHAR_LM, timeout=120
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: bad value for 'model.n_embd' in ")
    assert "expected a multiple of n_head=5" in lines[0]
    assert not any(tmp_path.iterdir())


def test_short_cpu_run_interrupted_and_resumed_is_bit_identical(tmp_path: Path) -> None:
    common = [
        f"paths.output_dir={tmp_path}",
        "trainer.max_steps=40",
        "checkpoint.every_n_steps=5",
        "trainer.progress_bar=false",
        "logging.tensorboard=false",
    ]
    reference = run_experiment([*common, "run_name=whole"], experiment=CHAR_LM, timeout=300)
    assert reference.returncode == 0, reference.stderr
    args = [*common, "run_name=stopped"]
    run_dir = tmp_path / "stopped"
    interrupt_at_step(args, run_dir, 15, experiment=CHAR_LM)
    stopped_at = newest_checkpoint_step(run_dir)
    assert 15 <= stopped_at < 40
    resumed = run_experiment(args, experiment=CHAR_LM, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped_at} " in resumed.stdout and "--- sample ---" in resumed.stdout
    assert_bit_identical(run_dir / "final_model.pt", tmp_path / "whole" / "final_model.pt")
