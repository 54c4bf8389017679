"""A tiny plain ``transformers.Trainer`` run through ``run_interruptible``, for the tests.

    python tests/support/hf_trainer_script.py OUTPUT_DIR [key=value ...]

Keys: ``max_steps`` (24), ``save_steps`` (4), ``s3_bucket``, ``endpoint_url``,
``budget_usd``, ``hourly_rate_usd``, ``step_sleep_s`` (pause per step, so a signal lands
mid-run), ``kill_in_save_at`` (SIGKILL itself inside the save of that step: the Trainer's
files written, the completeness record not yet), ``again`` (call run_interruptible a
second time once done). Prints ``rank R pid P`` at the start (under torchrun, a test
signals one rank) and ``step N`` after each step; on return rank 0 writes
``final_weights.pt`` and ``result.json`` (the status and the steps of the Trainer's
``log_history``). Other ``key=value`` arguments are ignored (the Slurm batch job appends
``run_name=``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from src.data.synthetic import RandomTokens  # noqa: E402
from src.integrations.hf_trainer import run_interruptible  # noqa: E402

SAMPLES, LENGTH, VOCAB = 48, 16, 64


class Steps(TrainerCallback):
    def __init__(self, sleep_s: float, kill_at: int) -> None:
        self.sleep_s, self.kill_at = sleep_s, kill_at

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        print(f"step {state.global_step}", flush=True)
        time.sleep(self.sleep_s)

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        # Added before run_interruptible's callback, so it runs before the record is written.
        if state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    output_dir = sys.argv[1]
    opts = dict(arg.split("=", 1) for arg in sys.argv[2:])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
    )
    model = LlamaForCausalLM(config)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=int(opts.get("max_steps", 24)),
        save_steps=int(opts.get("save_steps", 4)),
        save_total_limit=int(opts.get("save_total_limit", 2)),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(SAMPLES, LENGTH, VOCAB))
    print(f"rank {args.process_index} pid {os.getpid()}", flush=True)  # a signal to one rank
    steps = Steps(float(opts.get("step_sleep_s", 0)), int(opts.get("kill_in_save_at", -1)))
    trainer.add_callback(steps)
    budget = opts.get("budget_usd")
    rate = opts.get("hourly_rate_usd")
    result = run_interruptible(
        trainer,
        s3_bucket=opts.get("s3_bucket"),
        endpoint_url=opts.get("endpoint_url"),
        budget_usd=float(budget) if budget else None,
        hourly_rate_usd=float(rate) if rate else None,
    )
    if opts.get("again"):  # the same call once more: a finished run trains nothing
        run_interruptible(trainer)
    if not trainer.is_world_process_zero():
        return
    torch.save(model.state_dict(), Path(output_dir) / "final_weights.pt")
    steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"status": str(result.status), "steps": steps, "cost_usd": result.cost_usd}
    (Path(output_dir) / "result.json").write_text(json.dumps(summary))
    print(f"result {summary['status']} at step {result.global_step}", flush=True)


if __name__ == "__main__":
    main()
