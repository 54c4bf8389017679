"""A Hugging Face causal LM with LoRA adapters (PEFT): its settings, tokenizer and builders.

``LlmConfig`` is the LLM experiments' typed ``model:`` section. ``load_tokenizer``,
``load_base_model`` and ``build_lora_model`` turn it into a tokenizer, a base model and a
trainable ``PeftModel``; the SFT and DPO experiments and the ``hf`` exporter share them.

``model.name_or_path: tiny-llama`` needs no download: a 2-layer Llama-style model with
hidden size 64 over a byte-level tokenizer (ids 0-255 are the bytes, then a few special
tokens and a ChatML-style chat template), built from a fixed seed without touching the global
RNG, so it has the same weights on every machine. Dev configs and tests use it.

Call ``src.models.hf_cache.use_persistent_hf_cache()`` before importing this module: it
imports ``transformers``, which fixes the hub cache's place on import.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from src.common.errors import ConfigError
from src.common.paths import resolve_output_dir
from src.config import require

TINY_LLAMA = "tiny-llama"
TINY_LLAMA_SEED = 20240518  # the tiny model's weights; fixed so every machine builds the same
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
ALL_LINEAR = "all-linear"  # PEFT's keyword: every Linear layer except the output head
ADAPTER_CONFIG_FILE = "adapter_config.json"  # what marks a PEFT save_pretrained directory

# The tiny tokenizer's special tokens, after the 256 byte ids. ChatML markers (as Qwen uses)
# are single tokens, so the chat template's structure never mixes with the text's bytes.
TINY_PAD, TINY_BOS, TINY_IM_START, TINY_IM_END = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


LlmConfigT = TypeVar("LlmConfigT", bound="LlmConfig")


@dataclass
class LlmConfig:
    """The LLM experiments' ``model:`` section: which base, how it is loaded, the LoRA."""

    # A hub id ("Qwen/Qwen2.5-1.5B-Instruct"), a local directory, or "tiny-llama" (no download).
    name_or_path: str = TINY_LLAMA
    revision: str | None = None  # a hub branch, tag or commit; null: the default branch
    dtype: str = "auto"  # auto (the checkpoint's own; fp32 for tiny-llama) | bf16 | fp16 | fp32
    # QLoRA: the base in 4-bit NF4 (bitsandbytes, CUDA only), bf16 compute, adapters in fp32.
    load_in_4bit: bool = False
    # null: one device (the trainer places it); "auto": spread over every visible GPU.
    device_map: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    # A saved PEFT adapter to start from (e.g. an SFT run's final_adapter), loaded trainable.
    init_adapter: str | None = None
    trust_remote_code: bool = False  # runs the hub repo's own Python: only for repos you trust

    def __post_init__(self) -> None:
        # Checked here so a bad value is one config error at start-up, not a crash mid-load.
        require(bool(self.name_or_path), "name_or_path", self.name_or_path, "a hub id or dir")
        require(self.revision != "", "revision", self.revision, "null or a branch/tag/commit")
        require(
            self.revision is None or self.name_or_path != TINY_LLAMA,
            "revision",
            self.revision,
            f"null with name_or_path={TINY_LLAMA} (it is built, not downloaded)",
        )
        dtypes = ["auto", *DTYPES]
        require(self.dtype in dtypes, "dtype", self.dtype, f"one of {', '.join(dtypes)}")
        require(self.device_map != "", "device_map", self.device_map, 'null or "auto"')
        require(self.lora_r >= 1, "lora_r", self.lora_r, "an integer >= 1")
        require(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a number > 0")
        require(
            0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "a number in [0, 1)"
        )
        targets = list(self.target_modules)
        require(
            len(targets) > 0 and all(isinstance(name, str) and name for name in targets),
            "target_modules",
            targets,
            f'module names like ["q_proj", "v_proj"], or ["{ALL_LINEAR}"]',
        )
        require(
            ALL_LINEAR not in targets or len(targets) == 1,
            "target_modules",
            targets,
            f'["{ALL_LINEAR}"] alone, or a list of module names',
        )
        require(self.init_adapter != "", "init_adapter", self.init_adapter, "null or a dir")

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | DictConfig) -> LlmConfig:
        """The dataclass from a loaded config's ``cfg.model`` (a DictConfig) or a plain dict."""
        if isinstance(section, DictConfig):
            section = OmegaConf.to_container(section, resolve=True)  # type: ignore[assignment]
        return cls(**dict(section))

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path == TINY_LLAMA


@dataclass
class DpoLlmConfig(LlmConfig):
    """The DPO experiment's ``model:`` section: the LLM settings plus DPO's beta."""

    # How far the policy may move from the reference: larger keeps it closer (TRL's default).
    dpo_beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.dpo_beta > 0, "dpo_beta", self.dpo_beta, "a number > 0")


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table as a list: byte ``b`` is written as ``symbols[b]``.

    Printable bytes stand for themselves, the rest are shifted past 255, so every byte is one
    visible character the ByteLevel pre-tokenizer and decoder agree on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols: dict[int, str] = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return [symbols[byte] for byte in range(256)]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (token id = byte value, no merges) plus special tokens.

    Every text round-trips exactly, with no download and no training, so it is the same
    everywhere. Special ids: 256 pad, 257 bos, 258 ``<|im_start|>``, 259 ``<|im_end|>`` (eos).
    """
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([TINY_PAD, TINY_BOS, TINY_IM_START, TINY_IM_END])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=TINY_BOS,
        eos_token=TINY_IM_END,  # an assistant turn ends here, so generation stops here
        pad_token=TINY_PAD,
        chat_template=TINY_CHAT_TEMPLATE,
    )


def load_tokenizer(cfg: LlmConfig) -> PreTrainedTokenizerBase:
    """The base model's tokenizer (the tiny byte-level one for ``tiny-llama``).

    A tokenizer without a pad token (Llama 3) pads with its eos token: batches carry their
    own attention masks and labels, so the pad id is never trained on or attended to.
    """
    if cfg.is_tiny:
        return build_tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama_config() -> LlamaConfig:
    """The tiny model's architecture: 2 layers, hidden 64, 4 heads, the byte vocabulary."""
    tokenizer = build_tiny_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The tiny model, the same weights every time and on every machine.

    The weights are drawn inside ``fork_rng`` from a fixed seed: the caller's global RNG is
    neither read nor advanced, so seeding (or not) elsewhere changes nothing here.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        model = LlamaForCausalLM(tiny_llama_config())
    model.config.name_or_path = TINY_LLAMA  # the identity checkpoints and exports record
    return model.to(dtype)


def _bnb_4bit_config() -> Any:
    """QLoRA's quantization: NF4 weights, double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig  # noqa: PLC0415 (needs bitsandbytes only here)

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _check_4bit_possible() -> None:
    """A ConfigError (a ValueError: one line, exit 2 in a script) when 4-bit cannot load."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.load_in_4bit: true needs a CUDA GPU (bitsandbytes 4-bit); "
            "set model.load_in_4bit=false on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401, PLC0415 (an optional dependency, only for 4-bit)
    except ImportError:
        raise ConfigError(
            "model.load_in_4bit: true needs bitsandbytes: pip install bitsandbytes"
        ) from None


def load_base_model(
    cfg: LlmConfig, *, dtype: torch.dtype | None = None, quantize: bool = True
) -> PreTrainedModel:
    """The frozen base: ``tiny-llama`` built here, anything else through ``from_pretrained``.

    ``dtype`` overrides ``cfg.dtype``. ``quantize=False`` loads it unquantized even when
    ``cfg.load_in_4bit`` (to merge adapters into real weights for export). A quantized model,
    or one loaded with ``cfg.device_map``, is already placed on its GPU(s); any other comes
    back on the CPU and the trainer moves it.
    """
    quantized = cfg.load_in_4bit and quantize
    if quantized:
        _check_4bit_possible()
    if dtype is None and cfg.dtype != "auto":
        dtype = DTYPES[cfg.dtype]
    if dtype is None and (quantized or cfg.is_tiny):
        # bnb's non-quantized parts follow the bf16 compute; tiny-llama's own dtype is fp32.
        dtype = torch.bfloat16 if quantized else torch.float32
    if cfg.is_tiny and not quantized and cfg.device_map is None:
        return build_tiny_llama(dtype or torch.float32)
    if cfg.is_tiny:
        # Quantizing (or placing) goes through from_pretrained: save the tiny model first.
        with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tiny_dir:
            build_tiny_llama().save_pretrained(tiny_dir)
            return _from_pretrained(tiny_dir, cfg, dtype, quantized)
    return _from_pretrained(cfg.name_or_path, cfg, dtype, quantized)


def _from_pretrained(
    name_or_path: str, cfg: LlmConfig, dtype: torch.dtype | None, quantized: bool
) -> PreTrainedModel:
    options: dict[str, Any] = {
        "revision": cfg.revision,
        "dtype": dtype if dtype is not None else "auto",
        "trust_remote_code": cfg.trust_remote_code,
    }
    if quantized:
        options["quantization_config"] = _bnb_4bit_config()
        # bitsandbytes places the weights as it quantizes them: this process's GPU by default.
        options["device_map"] = cfg.device_map or {"": torch.cuda.current_device()}
    elif cfg.device_map is not None:
        options["device_map"] = cfg.device_map
    # Downloads show huggingface_hub's own progress bars; the time is billed like any other.
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **options)
    if name_or_path != cfg.name_or_path:
        model.config.name_or_path = cfg.name_or_path  # tiny-llama via a temporary directory
    return model


def lora_config(cfg: LlmConfig) -> LoraConfig:
    """PEFT's LoraConfig for ``cfg``'s r, alpha, dropout and target modules."""
    targets = list(cfg.target_modules)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        task_type="CAUSAL_LM",
    )


def check_adapter_dir(path: str | Path, key: str = "model.init_adapter") -> Path:
    """``path`` if it holds a PEFT adapter (``adapter_config.json``), else one ConfigError."""
    adapter_dir = Path(path).expanduser()
    if not (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        raise ConfigError(
            f"{key}: no PEFT adapter at {adapter_dir} ({ADAPTER_CONFIG_FILE} missing): "
            "name a directory written by save_pretrained, e.g. a run's final_adapter"
        )
    return adapter_dir


def resolve_init_adapter(cfg: LlmConfigT, output_dir: str | Path) -> LlmConfigT:
    """``cfg`` with a relative ``init_adapter`` made absolute under the resolved output root.

    ``init_adapter: llm-sft-dev/final_adapter`` then names that run's adapter wherever the
    runs live (``/workspace/persistent`` on the instance, ``./outputs`` on a laptop).
    """
    if cfg.init_adapter is None or Path(cfg.init_adapter).expanduser().is_absolute():
        return cfg
    return replace(cfg, init_adapter=str(resolve_output_dir(output_dir) / cfg.init_adapter))


def build_lora_model(cfg: LlmConfig) -> PeftModel:
    """The base with trainable LoRA adapters: fresh ones, or ``cfg.init_adapter`` loaded.

    Fresh adapters start with LoRA B = 0, so the model first computes exactly the base; LoRA
    A is drawn from the global RNG (seed it first, as the experiments do). A 4-bit base goes
    through ``prepare_model_for_kbit_training`` (norms in fp32, base frozen) first; gradient
    checkpointing is the trainer's switch (``trainer.gradient_checkpointing``), not set here.
    """
    base = load_base_model(cfg)
    if cfg.load_in_4bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    with warnings.catch_warnings():
        # PEFT 0.21 asks transformers 5 a deprecated question while wrapping; not ours to fix.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        if cfg.init_adapter is not None:
            adapter_dir = check_adapter_dir(cfg.init_adapter)
            return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        return get_peft_model(base, lora_config(cfg))
