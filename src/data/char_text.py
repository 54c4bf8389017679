"""Character-level text from files already on the machine: the repo's own Markdown and Python.

No downloads, so the data is there on any box the code is. Files matching
``data.patterns`` (relative to the repo root) are read in sorted path order and capped at
``data.max_chars``, so the same settings and the same checkout give the same corpus.
Editing the matched files changes the corpus: give a new ``run_name`` rather than resume.

The corpus is split on blank lines into paragraphs; paragraphs go to train, val or test
by a permutation seeded with ``data.seed`` (whole paragraphs, so no text is shared
between splits), then each is cut into samples of at most ``block_size + 1`` characters.
Samples have different lengths; ``pad_batch`` pads each batch to its longest.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from src.common.paths import REPO_ROOT
from src.config import DataConfig, require, split_sizes

PAD_ID = 0  # input padding; the vocabulary never gives a character this id
IGNORE_INDEX = -100  # target padding: F.cross_entropy's default ignore_index
MIN_SAMPLE_CHARS = 8  # shorter pieces teach little and mostly pad the batch


@dataclass
class CharTextDataConfig(DataConfig):
    """The char LM's ``data:`` section (batch_size and num_workers come from DataConfig)."""

    # Globs relative to the repo root; `**` spans folders and skips hidden ones (.venv, .git).
    patterns: list[str] = field(
        default_factory=lambda: ["*.md", "docs/**/*.md", "experiments/**/*.py", "src/**/*.py"]
    )
    max_chars: int = 200_000  # cap on the corpus, taken in sorted file order
    val_fraction: float = 0.1  # of paragraphs
    test_fraction: float = 0.1
    seed: int = 1234  # the split itself, independent of the training seed

    def __post_init__(self) -> None:
        super().__post_init__()
        require(len(self.patterns) > 0, "patterns", list(self.patterns), "at least one glob")
        require(self.max_chars >= 1, "max_chars", self.max_chars, "an integer >= 1")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            require(0.0 < value < 1.0, name, value, "a number in (0, 1)")
        fractions = self.val_fraction + self.test_fraction
        require(fractions < 1.0, "val_fraction", self.val_fraction, "val + test < 1")


class CharVocab:
    """Sorted characters with ids from 1; id 0 is padding, so ``len(vocab)`` is one more."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if any(len(char) != 1 for char in self.chars):
            raise ValueError("CharVocab takes single characters")
        self.char_to_id = {char: index + 1 for index, char in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(text)

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        try:
            return [self.char_to_id[char] for char in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text for ``ids``; padding ids are skipped."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(not 0 <= value < len(self) for value in values):
            raise ValueError(f"ids must be in [0, {len(self)}), got {values}")
        return "".join(self.chars[value - 1] for value in values if value != PAD_ID)


class CharTextDataset(Dataset):
    """Variable-length samples; item ``i`` is ``{"input_ids", "targets"}``, shifted by one."""

    def __init__(self, texts: Sequence[str], vocab: CharVocab) -> None:
        if any(len(text) < 2 for text in texts):
            raise ValueError("every sample needs at least 2 characters (one input, one target)")
        self.texts = list(texts)
        # Encoded once here, so __getitem__ is two slices (cheap in DataLoader workers).
        self.encoded = [torch.tensor(vocab.encode(text), dtype=torch.long) for text in texts]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.encoded[index]
        return {"input_ids": ids[:-1], "targets": ids[1:]}


@dataclass
class CharTextData:
    vocab: CharVocab
    train: CharTextDataset
    val: CharTextDataset
    test: CharTextDataset
    num_chars: int  # corpus size after the max_chars cap
    files: list[Path]


def corpus_files(patterns: Sequence[str], root: Path = REPO_ROOT) -> list[Path]:
    """Files matching any pattern under ``root``, each once, sorted by relative path."""
    matches = {
        relative
        for pattern in patterns
        for relative in glob.glob(pattern, root_dir=root, recursive=True)
        if (root / relative).is_file()
    }
    return [root / relative for relative in sorted(matches, key=lambda p: Path(p).as_posix())]


def load_corpus(files: Sequence[Path], max_chars: int) -> str:
    """The files' text in order, a blank line between files, cut at ``max_chars``."""
    parts: list[str] = []
    total = 0
    for path in files:
        if total >= max_chars:
            break
        text = path.read_text(encoding="utf-8", errors="replace") + "\n\n"
        parts.append(text)
        total += len(text)
    return "".join(parts)[:max_chars]


def split_paragraphs(text: str) -> list[str]:
    """Pieces between blank lines, each ending in one newline; indentation is kept."""
    pieces = (piece.strip("\n") for piece in re.split(r"\n[ \t]*\n", text))
    return [piece + "\n" for piece in pieces if piece.strip()]


def cut_samples(paragraph: str, block_size: int) -> list[str]:
    """Windows of at most ``block_size + 1`` chars, overlapping by one so that every
    next-character pair is trained on; tiny leftovers are dropped."""
    windows = [
        paragraph[start : start + block_size + 1]
        for start in range(0, max(1, len(paragraph) - 1), block_size)
    ]
    return [window for window in windows if len(window) >= MIN_SAMPLE_CHARS]


def build_char_datasets(
    data_cfg: CharTextDataConfig | DictConfig, block_size: int, root: Path = REPO_ROOT
) -> CharTextData:
    """Vocabulary (from the whole corpus) and the train/val/test datasets."""
    files = corpus_files(list(data_cfg.patterns), root)
    if not files:
        raise ValueError(f"data.patterns {list(data_cfg.patterns)} match no files under {root}")
    text = load_corpus(files, data_cfg.max_chars)
    vocab = CharVocab.from_text(text)
    paragraphs = split_paragraphs(text)
    _, num_val, num_test = split_sizes(
        len(paragraphs), data_cfg.val_fraction, data_cfg.test_fraction
    )
    if len(paragraphs) - num_val - num_test < 1:
        raise ValueError(
            f"only {len(paragraphs)} paragraphs in {len(text)} chars: raise data.max_chars"
        )
    generator = torch.Generator().manual_seed(data_cfg.seed)
    order = torch.randperm(len(paragraphs), generator=generator).tolist()
    split_orders = {
        "val": order[:num_val],
        "test": order[num_val : num_val + num_test],
        "train": order[num_val + num_test :],
    }
    datasets = {
        name: CharTextDataset(
            [sample for i in sorted(indices) for sample in cut_samples(paragraphs[i], block_size)],
            vocab,
        )
        for name, indices in split_orders.items()
    }
    for name, dataset in datasets.items():
        if len(dataset) == 0:
            raise ValueError(f"the {name} split is empty: raise data.max_chars")
    return CharTextData(
        vocab, datasets["train"], datasets["val"], datasets["test"], len(text), files
    )


def pad_batch(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the longest sample: inputs with PAD_ID, targets with IGNORE_INDEX (no loss)."""
    lengths = torch.tensor([len(sample["input_ids"]) for sample in samples], dtype=torch.long)
    input_ids = pad_sequence(
        [sample["input_ids"] for sample in samples], batch_first=True, padding_value=PAD_ID
    )
    targets = pad_sequence(
        [sample["targets"] for sample in samples], batch_first=True, padding_value=IGNORE_INDEX
    )
    return {"input_ids": input_ids, "targets": targets, "lengths": lengths}
