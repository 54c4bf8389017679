"""LLM fine-tuning's data and model loading, in-process: the tiny byte tokenizer and its chat
template, prompt masking (only answers train), packing, splits, collators, picklable
datasets, the tiny Llama's fixed weights, the settings' one-line errors, the HF cache."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from src.common.errors import ConfigError
from src.common.paths import REPO_ROOT
from src.config import experiment_schema, load_config
from src.data.chat import (
    IGNORE_INDEX,
    ChatCollator,
    ChatDataConfig,
    PreferenceCollator,
    PreferenceDataConfig,
    build_chat_datasets,
    build_preference_datasets,
    tokenize_conversation,
)
from src.models import hf_cache
from src.models.llm import (
    TINY_CHAT_TEMPLATE,
    DpoLlmConfig,
    LlmConfig,
    build_lora_model,
    build_tiny_llama,
    build_tiny_tokenizer,
    load_base_model,
    resolve_init_adapter,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "An apple."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "A pear."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def trained_segments(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """The decoded runs of consecutive tokens whose label is not -100."""
    segments, current = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # an answer token's label is the token itself
            current.append(token)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return segments


def test_tiny_tokenizer_round_trips_any_text(tokenizer) -> None:
    for text in ["Hello, world!", "  two  spaces\n\ttab", "héllo wörld ✓ 日本語 🙂", "", "<|x|>"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert all(0 <= i < 256 for i in ids)  # bytes only: no special token from plain text
    assert len(tokenizer) == 260
    special = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert special == [256, 257, 259]
    # Built twice: the same vocabulary (nothing depends on hash order).
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_chat_template_renders_chatml_with_a_generation_prompt(tokenizer) -> None:
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    messages = CONVERSATION[1:3]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|bos|><|im_start|>user\nName a fruit.<|im_end|>\n"
        "<|im_start|>assistant\nAn apple.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"


def test_only_assistant_answers_train(tokenizer) -> None:
    input_ids, labels = tokenize_conversation(tokenizer, CONVERSATION)
    assert trained_segments(tokenizer, input_ids, labels) == [
        "An apple.<|im_end|>\n",
        "A pear.<|im_end|>\n",
    ]
    decoded_prompt = tokenizer.decode(input_ids[labels == IGNORE_INDEX])
    assert "Be brief." in decoded_prompt and "Another?" in decoded_prompt
    assert "apple" not in decoded_prompt
    # Preference pairs score the last answer only: earlier turns belong to the prompt.
    input_ids, labels = tokenize_conversation(tokenizer, CONVERSATION, last_answer_only=True)
    assert trained_segments(tokenizer, input_ids, labels) == ["A pear.<|im_end|>\n"]


def test_without_a_chat_template_a_plain_layout_masks_the_same_way() -> None:
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    input_ids, labels = tokenize_conversation(plain, CONVERSATION)
    text = plain.decode(input_ids)
    assert text.startswith("<|bos|>### system\nBe brief.\n\n### user\nName a fruit.")
    assert trained_segments(plain, input_ids, labels) == [
        "An apple.<|im_end|>",
        "A pear.<|im_end|>",
    ]


def test_sample_data_splits_are_deterministic_and_disjoint(tokenizer) -> None:
    data = build_chat_datasets(ChatDataConfig(max_length=256), tokenizer)
    again = build_chat_datasets(ChatDataConfig(max_length=256), tokenizer)
    sizes = (len(data.train), len(data.val), len(data.test))
    assert sum(sizes) == data.num_examples >= 60 and data.num_dropped == 0
    texts = {
        name: {tokenizer.decode(ids) for ids, _ in getattr(data, name).examples}
        for name in ("train", "val", "test")
    }
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"])
    for first, second in zip(data.train.examples, again.train.examples, strict=True):
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # Another data.seed, another split.
    other = build_chat_datasets(ChatDataConfig(max_length=256, seed=7), tokenizer)
    assert {tokenizer.decode(ids) for ids, _ in other.val.examples} != texts["val"]


def test_packing_makes_full_blocks_and_keeps_the_masks(tokenizer) -> None:
    whole = build_chat_datasets(ChatDataConfig(max_length=4096), tokenizer)
    packed = build_chat_datasets(ChatDataConfig(max_length=64, packing=True), tokenizer)
    for name in ("train", "val", "test"):
        blocks = getattr(packed, name).examples
        assert all(len(ids) == 64 for ids, _ in blocks[:-1]) and 0 < len(blocks[-1][0]) <= 64
        examples = getattr(whole, name).examples
        assert torch.equal(torch.cat([i for i, _ in blocks]), torch.cat([i for i, _ in examples]))
        assert torch.equal(
            torch.cat([la for _, la in blocks]), torch.cat([la for _, la in examples])
        )
    # Without packing, a long example is cut at max_length.
    cut = build_chat_datasets(ChatDataConfig(max_length=40), tokenizer)
    assert max(len(ids) for ids, _ in cut.train.examples) == 40


def test_chat_collator_pads_and_masks(tokenizer) -> None:
    data = build_chat_datasets(ChatDataConfig(max_length=128), tokenizer)
    samples = [data.train[i] for i in range(4)]
    batch = ChatCollator(tokenizer.pad_token_id)(samples)
    lengths = [len(sample["input_ids"]) for sample in samples]
    assert batch["input_ids"].shape == (4, max(lengths))
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
        assert torch.equal(batch["labels"][row, :length], samples[row]["labels"])


def test_preference_pairs_score_the_responses_only(tokenizer) -> None:
    data = build_preference_datasets(PreferenceDataConfig(max_length=128), tokenizer)
    assert len(data.train) + len(data.val) + len(data.test) == data.num_examples >= 40
    pair = data.train[0]
    for side in ("chosen", "rejected"):
        segments = trained_segments(tokenizer, pair[f"{side}_input_ids"], pair[f"{side}_labels"])
        assert len(segments) == 1 and segments[0].endswith("<|im_end|>\n")
        prompt_ids = pair[f"{side}_input_ids"][pair[f"{side}_labels"] == IGNORE_INDEX]
        assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    batch = PreferenceCollator(tokenizer.pad_token_id)([data.train[i] for i in range(3)])
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["chosen_input_ids"].shape[0] == 3


def test_datasets_and_collators_work_in_two_dataloader_workers(tokenizer) -> None:
    data = build_chat_datasets(ChatDataConfig(max_length=128), tokenizer)
    collate = ChatCollator(tokenizer.pad_token_id)
    assert pickle.loads(pickle.dumps(collate)) == collate
    loader = DataLoader(data.val, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sum(len(batch["input_ids"]) for batch in batches) == len(data.val)
    pairs = build_preference_datasets(PreferenceDataConfig(max_length=128), tokenizer)
    assert len(pickle.loads(pickle.dumps(pairs.val))) == len(pairs.val)


def test_tiny_llama_is_the_same_every_time_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1)
    first = build_tiny_llama()
    after_build = torch.rand(3)
    torch.manual_seed(1)
    expected = torch.rand(3)
    assert torch.equal(after_build, expected)  # the build neither read nor advanced it
    torch.manual_seed(12345)  # another global state: the same weights
    second = build_tiny_llama()
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    config = first.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.vocab_size == len(build_tiny_tokenizer())
    assert config.name_or_path == "tiny-llama"


def test_base_model_dtype_and_lora_wrapping() -> None:
    cfg = LlmConfig(dtype="bf16")
    assert load_base_model(cfg).dtype == torch.bfloat16
    assert load_base_model(cfg, dtype=torch.float32).dtype == torch.float32
    model = build_lora_model(LlmConfig(lora_r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert all("q_proj" in name or "v_proj" in name for name in trainable)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dtype": "f16"}, "dtype: 'f16', expected one of auto, bf16, fp16, fp32"),
        ({"lora_r": 0}, "lora_r: 0, expected an integer >= 1"),
        ({"lora_dropout": 1.0}, "lora_dropout: 1.0, expected a number in \\[0, 1\\)"),
        ({"target_modules": []}, "target_modules: \\[\\], expected module names"),
        ({"target_modules": ["all-linear", "q_proj"]}, 'expected \\["all-linear"\\] alone'),
        ({"revision": "main"}, "revision: 'main', expected null with name_or_path=tiny-llama"),
        ({"name_or_path": ""}, "name_or_path: '', expected a hub id or dir"),
    ],
)
def test_bad_model_settings_raise_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        LlmConfig(**settings)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("cls", "settings", "message"),
    [
        (ChatDataConfig, {"max_length": 4}, "max_length: 4, expected an integer >= 8"),
        (ChatDataConfig, {"val_fraction": 0.6, "test_fraction": 0.5}, "val \\+ test < 1"),
        (PreferenceDataConfig, {"packing": True}, "packing: True, expected false"),
        (DpoLlmConfig, {"dpo_beta": 0.0}, "dpo_beta: 0.0, expected a number > 0"),
    ],
)
def test_bad_data_and_dpo_settings_raise_one_line(cls: type, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**settings)


CONFIGS = {
    "llm_sft_dev.yaml": (LlmConfig, ChatDataConfig),
    "llm_sft_prod.yaml": (LlmConfig, ChatDataConfig),
    "llm_dpo_dev.yaml": (DpoLlmConfig, PreferenceDataConfig),
    "llm_dpo_prod.yaml": (DpoLlmConfig, PreferenceDataConfig),
}


def test_the_four_configs_are_valid_and_a_bad_override_is_one_line() -> None:
    for name, (model, data) in CONFIGS.items():
        load_config(REPO_ROOT / "configs" / name, schema=experiment_schema(model, data))
    with pytest.raises(ConfigError) as raised:
        load_config(
            REPO_ROOT / "configs" / "llm_sft_dev.yaml",
            ["model.lora_alpha=-1"],
            schema=experiment_schema(LlmConfig, ChatDataConfig),
        )
    assert str(raised.value).startswith("bad value for 'model.lora_alpha' in ")
    assert "\n" not in str(raised.value)


def test_missing_data_adapter_and_gpu_are_one_line_config_errors(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(ConfigError, match="data.path: no file at "):
        build_chat_datasets(ChatDataConfig(path=str(tmp_path / "none.jsonl")), tokenizer)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: no assistant message"):
        build_chat_datasets(ChatDataConfig(path=str(bad_line)), tokenizer)
    with pytest.raises(ConfigError, match="model.init_adapter: no PEFT adapter at "):
        build_lora_model(LlmConfig(init_adapter=str(tmp_path)))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="load_in_4bit: true needs a CUDA GPU"):
            load_base_model(LlmConfig(load_in_4bit=True))


def test_relative_init_adapter_is_a_run_under_the_output_dir(tmp_path: Path) -> None:
    cfg = resolve_init_adapter(DpoLlmConfig(init_adapter="sft/final_adapter"), tmp_path)
    assert cfg.init_adapter == str(tmp_path / "sft" / "final_adapter")
    assert cfg.dpo_beta == 0.1  # the subclass survives
    absolute = DpoLlmConfig(init_adapter="/abs/adapter")
    assert resolve_init_adapter(absolute, tmp_path) is absolute


def test_hf_cache_goes_to_the_volume_unless_hf_home_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "mine"))
    assert hf_cache.use_persistent_hf_cache() == tmp_path / "mine"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setattr(hf_cache, "VOLUME_ROOT", tmp_path / "absent")
    assert hf_cache.use_persistent_hf_cache() == hf_cache.default_hf_home()
    assert "HF_HOME" not in os.environ
    volume = tmp_path / "workspace"
    volume.mkdir()
    monkeypatch.setattr(hf_cache, "VOLUME_ROOT", volume)
    assert hf_cache.use_persistent_hf_cache() == volume / ".cache" / "huggingface"
    assert os.environ["HF_HOME"] == str(volume / ".cache" / "huggingface")
    output = capsys.readouterr()
    assert f"Hugging Face cache: {volume / '.cache' / 'huggingface'}" in output.out
    # transformers is imported in this process already: the user is told it is too late.
    assert "imported before use_persistent_hf_cache" in output.err
