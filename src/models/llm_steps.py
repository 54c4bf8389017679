"""Step functions for LLM fine-tuning: SFT (next-token loss on answers) and DPO.

``sft_step`` / ``sft_eval`` and ``dpo_step`` are what ``InterruptibleTrainer`` takes as
``step_fn`` / ``eval_fn``, ``make_optimizer`` its ``optimizer_fn``; batches come from
``src.data.chat``'s collators.

Why not TRL's ``DPOTrainer``: this repo's trainer owns the loop (interruptible at any step,
exact resume, checkpoints, S3 mirror, cost), and TRL's DPO loss lives inside its own
``transformers.Trainer`` subclass, so using it means handing the loop over. The loss itself
is a few lines (Rafailov et al. 2023, the sigmoid form TRL uses by default), written here on
the same batch layout.

The DPO reference model is the same ``PeftModel`` with its adapter switched off
(``model.disable_adapter()``, under ``torch.no_grad``), as TRL does for a PEFT model without a
``ref_adapter_name``: no second copy of the base in memory. Starting from an SFT adapter
(``model.init_adapter``) therefore measures rewards against the base model, not the SFT one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.data.chat import IGNORE_INDEX

SIDES = ("chosen", "rejected")
ADAM_BETAS = (0.9, 0.999)  # PEFT's and TRL's usual AdamW for adapters


def make_optimizer(model: nn.Module, optim_cfg: Any) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (the adapters): frozen base weights get no
    optimizer state. ``optim_cfg`` needs ``lr`` and ``weight_decay`` (the config's ``optim:``).
    """
    params = [param for param in model.parameters() if param.requires_grad]
    return torch.optim.AdamW(
        params, lr=float(optim_cfg.lr), weight_decay=float(optim_cfg.weight_decay), betas=ADAM_BETAS
    )


def sft_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own shifted cross-entropy over answer tokens (labels != -100)."""
    loss = model(**batch, use_cache=False).loss  # no key/value cache: nothing generates here
    return {"loss": loss}


def sft_eval(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``loss`` and ``perplexity`` (exp of the batch's loss), logged as ``val/...``."""
    loss = model(**batch, use_cache=False).loss
    return {"loss": loss, "perplexity": loss.detach().exp()}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum of log p(token) over the tokens whose label is not -100.

    Token ``t``'s probability comes from the logits at ``t - 1`` (the usual shift). Computed
    in fp32 as ``logit - logsumexp``, which needs no full log-softmax tensor.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)  # any valid index; masked out below
    picked = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    token_logps = picked - logits.logsumexp(dim=-1)
    return (token_logps * mask).sum(dim=-1)


def _peft_model(model: nn.Module) -> Any:
    """The PeftModel under a DDP or compile wrapper (``disable_adapter`` lives on it)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    if not hasattr(inner, "disable_adapter"):
        raise TypeError(
            "dpo_step needs a PEFT model (the reference is the model with its adapter off): "
            "build it with src.models.llm.build_lora_model"
        )
    return inner


def preference_logps(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs, from one forward over both halves."""
    input_ids = torch.cat([batch[f"{side}_input_ids"] for side in SIDES])
    attention_mask = torch.cat([batch[f"{side}_attention_mask"] for side in SIDES])
    labels = torch.cat([batch[f"{side}_labels"] for side in SIDES])
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps = sequence_logps(logits, labels)
    half = batch["chosen_input_ids"].shape[0]
    return logps[:half], logps[half:]


def reference_logps(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (chosen, rejected) log-probs: the same model, adapter disabled."""
    peft_model = _peft_model(model)
    with torch.no_grad(), peft_model.disable_adapter():
        return preference_logps(peft_model, batch)


def dpo_step(
    model: nn.Module, batch: dict[str, torch.Tensor], beta: float = 0.1
) -> dict[str, torch.Tensor]:
    """DPO's sigmoid loss, ``-log sigmoid(beta * (policy margin - reference margin))``.

    Returns ``loss``, the implicit rewards ``rewards/chosen`` and ``rewards/rejected``
    (``beta * (log pi - log pi_ref)``), ``rewards/margin`` (chosen - rejected) and
    ``rewards/accuracy`` (the share of pairs whose chosen reward is higher), batch means.
    With a fresh adapter (LoRA B = 0) the policy is the reference and the loss is log 2.
    """
    ref_chosen, ref_rejected = reference_logps(model, batch)
    policy_chosen, policy_rejected = preference_logps(model, batch)
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "loss": loss,
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
