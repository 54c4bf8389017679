"""Chat data for LLM fine-tuning: SFT conversations and DPO preference pairs, from JSONL.

SFT lines are ``{"messages": [{"role": ..., "content": ...}, ...]}`` or
``{"prompt": ..., "response": ...}`` (an optional ``"system"`` in either). Preference lines are
``{"prompt": ..., "chosen": ..., "rejected": ...}``; ``prompt`` is a string or a message list.

Each conversation is rendered with the tokenizer's chat template when it has one (a plain
``### role`` layout otherwise) and tokenized once; only assistant answers train: every other
token's label is -100 (``IGNORE_INDEX``), which Hugging Face models leave out of the loss.
Which characters are answers is found by rendering the conversation prefix by prefix, so it
holds for any template that renders a conversation as its prefixes' continuation.

Examples go to train, val or test by a permutation seeded with ``data.seed`` (whole
examples, so no text is shared between splits). ``data.packing: true`` then concatenates a
split's examples into blocks of ``max_length`` tokens (the masks travel with the tokens;
examples in a block attend to earlier ones, the usual cheap packing); otherwise each example
is cut at ``max_length`` and ``ChatCollator`` pads each batch to its longest. Datasets hold
tensors only, so DataLoader workers pickle them cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from src.common.errors import ConfigError
from src.common.paths import REPO_ROOT
from src.config import DataConfig, require, split_sizes

if TYPE_CHECKING:  # transformers costs seconds to import; this module only needs its type
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label of a token that does not train (transformers' default)
ROLES = ("system", "user", "assistant")

Example = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), both 1-D long
T = TypeVar("T")


@dataclass
class ChatDataConfig(DataConfig):
    """The SFT experiment's ``data:`` section (batch_size and num_workers from DataConfig)."""

    path: str = "data/samples/sft_chat.jsonl"  # JSONL; relative paths are from the repo root
    max_length: int = 512  # tokens per example (cut beyond), or per block when packing
    packing: bool = False  # concatenate examples into full max_length blocks: no padding
    val_fraction: float = 0.1  # of examples
    test_fraction: float = 0.1
    seed: int = 1234  # the split itself, independent of the training seed

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.path), "path", self.path, "a JSONL file")
        require(self.max_length >= 8, "max_length", self.max_length, "an integer >= 8")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            require(0.0 < value < 1.0, name, value, "a number in (0, 1)")
        fractions = self.val_fraction + self.test_fraction
        require(fractions < 1.0, "val_fraction", self.val_fraction, "val + test < 1")


@dataclass
class PreferenceDataConfig(ChatDataConfig):
    """The DPO experiment's ``data:`` section: preference pairs, never packed."""

    path: str = "data/samples/dpo_preferences.jsonl"

    def __post_init__(self) -> None:
        super().__post_init__()
        # DPO scores each response as a whole sequence: packing would mix them.
        require(not self.packing, "packing", self.packing, "false for preference pairs")


def data_file(path: str, root: Path = REPO_ROOT) -> Path:
    """``data.path`` as a file: absolute, or relative to the repo root; one line if missing."""
    resolved = Path(path).expanduser()
    resolved = resolved if resolved.is_absolute() else root / resolved
    if not resolved.is_file():
        raise ConfigError(f"data.path: no file at {resolved}")
    return resolved


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line; a bad line is one ConfigError."""
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{line_no}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{line_no}: expected a JSON object per line")
        records.append((line_no, record))
    if not records:
        raise ConfigError(f"data.path: {path} holds no examples")
    return records


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list")
    for message in messages:
        if (
            not isinstance(message, Mapping)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise ConfigError(
                f"{where}: each message needs 'role' ({', '.join(ROLES)}) and 'content' (text)"
            )
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _prompt_messages(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """The prompt of a prompt/response or preference record as messages."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _check_messages(prompt, where)
    if isinstance(record.get("system"), str):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def record_messages(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """An SFT record as a message list: ``messages`` itself, or prompt + response."""
    if "messages" in record:
        messages = _check_messages(record["messages"], where)
    elif isinstance(record.get("response"), str):
        messages = _prompt_messages(record, where)
        messages.append({"role": "assistant", "content": record["response"]})
    else:
        raise ConfigError(f"{where}: expected 'messages', or 'prompt' and 'response'")
    if not any(message["role"] == "assistant" for message in messages):
        raise ConfigError(f"{where}: no assistant message to train on")
    return messages


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    last_answer_only: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of the assistant answers that train.

    With a chat template, an answer spans from the end of the prompt rendered with the
    generation prompt to the end of the conversation rendered through that answer, so its
    end-of-turn marker trains too (that is how the model learns to stop). Without one, a
    plain ``### role`` layout; each answer ends in the eos token.
    """
    answer_turns = [
        index for index, message in enumerate(messages) if message["role"] == "assistant"
    ]
    if last_answer_only:
        answer_turns = answer_turns[-1:]
    if getattr(tokenizer, "chat_template", None):
        text = _render(tokenizer, messages)
        spans = []
        for turn in answer_turns:
            prompt = _render(tokenizer, messages[:turn], add_generation_prompt=True)
            through = _render(tokenizer, messages[: turn + 1])
            if not (text.startswith(through) and through.startswith(prompt)):
                raise ConfigError(
                    f"the chat template of {tokenizer.name_or_path!r} does not render a "
                    "conversation as the continuation of its prefixes: prompt tokens cannot be "
                    "told from answer tokens"
                )
            spans.append((len(prompt), len(through)))
        return text, spans
    parts = [tokenizer.bos_token or ""]
    spans = []
    for index, message in enumerate(messages):
        parts.append(f"### {message['role']}\n")
        start = sum(map(len, parts))
        parts.append(message["content"])
        if message["role"] == "assistant":
            parts.append(tokenizer.eos_token or "")
            if index in answer_turns:
                spans.append((start, sum(map(len, parts))))
        parts.append("\n\n")
    return "".join(parts), spans


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    max_length: int | None = None,
    last_answer_only: bool = False,
) -> Example:
    """``(input_ids, labels)``: labels are the ids inside answer spans and -100 elsewhere.

    A token counts as answer when any of its characters is (offsets from a fast tokenizer).
    ``max_length`` cuts the end off a longer conversation.
    """
    text, spans = render_conversation(tokenizer, messages, last_answer_only)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("chat data needs a fast (Rust) tokenizer: it reads token offsets")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [
        token
        if any(start < span_end and end > span_start for span_start, span_end in spans)
        else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def trains_anything(labels: torch.Tensor) -> bool:
    """Whether any label is real: the model shifts labels, so the first one never counts."""
    return bool((labels[1:] != IGNORE_INDEX).any())


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Examples concatenated in order and cut into ``max_length`` blocks (the last may be
    shorter; the collator pads it). Each token keeps its label."""
    if not examples:
        return []
    input_ids = torch.cat([ids for ids, _ in examples])
    labels = torch.cat([labels for _, labels in examples])
    return [
        (input_ids[start : start + max_length], labels[start : start + max_length])
        for start in range(0, len(input_ids), max_length)
    ]


class ChatDataset(Dataset):
    """Tokenized SFT samples; item ``i`` is ``{"input_ids", "labels"}`` (1-D, unpadded)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids, labels = self.examples[index]
        return {"input_ids": input_ids, "labels": labels}


@dataclass
class ChatData:
    train: ChatDataset
    val: ChatDataset
    test: ChatDataset
    num_examples: int  # lines in the file
    num_dropped: int  # examples with no answer token left within max_length


def split_items(items: Sequence[T | None], data_cfg: Any, what: str) -> dict[str, list[T]]:
    """Items per split, by a permutation of the file's lines seeded with ``data.seed``, each
    split in file order; ``None`` (an example dropped for length) is left out."""
    count = len(items)
    _, num_val, num_test = split_sizes(count, data_cfg.val_fraction, data_cfg.test_fraction)
    if count - num_val - num_test < 1:
        raise ConfigError(
            f"data.path: only {count} examples: too few for a train, val and test split"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(data_cfg.seed)).tolist()
    indices = {
        "train": order[num_val + num_test :],
        "val": order[:num_val],
        "test": order[num_val : num_val + num_test],
    }
    splits = {}
    for name, split in indices.items():
        kept = [item for index in sorted(split) if (item := items[index]) is not None]
        if not kept:
            raise ConfigError(
                f"data.path: the {name} split has no {what} within "
                f"data.max_length={data_cfg.max_length}"
            )
        splits[name] = kept
    return splits


def build_chat_datasets(
    data_cfg: ChatDataConfig | DictConfig,
    tokenizer: PreTrainedTokenizerBase,
    root: Path = REPO_ROOT,
) -> ChatData:
    """Train/val/test SFT datasets from ``data.path``, tokenized, masked, packed or not."""
    path = data_file(data_cfg.path, root)
    records = read_jsonl(path)
    examples: list[Example | None] = []
    for line_no, record in records:
        messages = record_messages(record, f"{path}:{line_no}")
        # Packing keeps the whole example (it spans blocks); otherwise cut at max_length.
        limit = None if data_cfg.packing else data_cfg.max_length
        input_ids, labels = tokenize_conversation(tokenizer, messages, limit)
        examples.append((input_ids, labels) if trains_anything(labels) else None)
    splits = {
        name: ChatDataset(pack_examples(kept, data_cfg.max_length) if data_cfg.packing else kept)
        for name, kept in split_items(examples, data_cfg, "example with an answer token").items()
    }
    num_dropped = sum(example is None for example in examples)
    return ChatData(splits["train"], splits["val"], splits["test"], len(records), num_dropped)


def prompt_completion_splits(
    path: Path, data_cfg: ChatDataConfig | DictConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Train/val/test rows ``{"prompt": messages, "completion": [last message]}`` (TRL's
    conversational prompt-completion form), split exactly as :func:`build_chat_datasets`
    splits the same file; TRL tokenizes and cuts them itself."""
    rows: list[dict[str, Any] | None] = []
    for line_no, record in read_jsonl(path):
        messages = record_messages(record, f"{path}:{line_no}")
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    splits = split_items(rows, data_cfg, "conversation")
    return splits["train"], splits["val"], splits["test"]


def pad_examples(
    input_ids: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    pad_token_id: int,
    length: int,
) -> dict[str, torch.Tensor]:
    """Right-pad to ``length``: ids with ``pad_token_id``, labels with -100, mask 0 on pads."""
    padded_ids = torch.full((len(input_ids), length), pad_token_id, dtype=torch.long)
    padded_labels = torch.full((len(input_ids), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(input_ids), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(zip(input_ids, labels, strict=True)):
        padded_ids[row, : len(ids)] = ids
        padded_labels[row, : len(ids)] = row_labels
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": padded_ids, "attention_mask": attention_mask, "labels": padded_labels}


@dataclass(frozen=True)
class ChatCollator:
    """The SFT collate_fn: ``{"input_ids", "attention_mask", "labels"}`` padded to the
    batch's longest sample. A plain dataclass, so DataLoader workers can pickle it."""

    pad_token_id: int

    def __call__(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(sample["input_ids"]) for sample in samples)
        return pad_examples(
            [sample["input_ids"] for sample in samples],
            [sample["labels"] for sample in samples],
            self.pad_token_id,
            length,
        )


# ---- preference pairs (DPO) ----

PreferencePair = tuple[Example, Example]  # (chosen, rejected)


class PreferenceDataset(Dataset):
    """Tokenized pairs; item ``i`` is ``{"chosen_input_ids", "chosen_labels",
    "rejected_input_ids", "rejected_labels"}``: the prompt plus one response each, labels
    only on the response."""

    def __init__(self, pairs: Sequence[PreferencePair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = self.pairs[index]
        return {
            "chosen_input_ids": chosen_ids,
            "chosen_labels": chosen_labels,
            "rejected_input_ids": rejected_ids,
            "rejected_labels": rejected_labels,
        }


@dataclass
class PreferenceData:
    train: PreferenceDataset
    val: PreferenceDataset
    test: PreferenceDataset
    num_examples: int
    num_dropped: int  # pairs where a response had no token left within max_length


def build_preference_datasets(
    data_cfg: ChatDataConfig | DictConfig,
    tokenizer: PreTrainedTokenizerBase,
    root: Path = REPO_ROOT,
) -> PreferenceData:
    """Train/val/test preference datasets from ``data.path`` (prompt, chosen, rejected)."""
    path = data_file(data_cfg.path, root)
    records = read_jsonl(path)
    pairs: list[PreferencePair | None] = []
    for line_no, record in records:
        where = f"{path}:{line_no}"
        if not (isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str)):
            raise ConfigError(f"{where}: expected 'prompt', 'chosen' and 'rejected' (text)")
        prompt = _prompt_messages(record, where)
        chosen, rejected = (
            tokenize_conversation(
                tokenizer,
                [*prompt, {"role": "assistant", "content": record[key]}],
                data_cfg.max_length,
                last_answer_only=True,  # earlier assistant turns are part of the prompt
            )
            for key in ("chosen", "rejected")
        )
        keep = trains_anything(chosen[1]) and trains_anything(rejected[1])
        pairs.append((chosen, rejected) if keep else None)
    splits = {
        name: PreferenceDataset(kept)
        for name, kept in split_items(pairs, data_cfg, "pair with response tokens").items()
    }
    num_dropped = sum(pair is None for pair in pairs)
    return PreferenceData(splits["train"], splits["val"], splits["test"], len(records), num_dropped)


@dataclass(frozen=True)
class PreferenceCollator:
    """The DPO collate_fn: chosen and rejected padded to one common length, so the step can
    run both through the model as one batch. Keys: ``chosen_input_ids``,
    ``chosen_attention_mask``, ``chosen_labels`` and the same for ``rejected_``."""

    pad_token_id: int

    def __call__(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(
            len(sample[f"{side}_input_ids"])
            for sample in samples
            for side in ("chosen", "rejected")
        )
        batch: dict[str, torch.Tensor] = {}
        for side in ("chosen", "rejected"):
            padded = pad_examples(
                [sample[f"{side}_input_ids"] for sample in samples],
                [sample[f"{side}_labels"] for sample in samples],
                self.pad_token_id,
                length,
            )
            batch.update({f"{side}_{key}": value for key, value in padded.items()})
        return batch
