"""Tiny causal LMs and a word-level tokenizer, built locally: no Hub, no downloads.

``build_tiny_model(dir, seed)`` builds a 2-block Llama (hidden size 16) from ``AutoConfig``
and saves it with a tokenizer that ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``
load like any real checkpoint; different seeds give the same architecture with different weights.
"""

from __future__ import annotations

from pathlib import Path

WORDS = "the capital of france is paris explain why sky blue in one sentence hello world".split()
PROMPTS = ["the capital of france is", "explain why the sky is blue", "hello world"]
NUM_LAYERS = 2


def build_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["[UNK]", "[PAD]", *WORDS])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def build_tiny_model(directory: Path, seed: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
