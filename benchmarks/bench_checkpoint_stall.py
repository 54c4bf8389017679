"""Training stall per checkpoint: asynchronous CheckpointManager.save() against a
synchronous torch.save of the same state, plus the extra host memory each costs.

The stall is the time the training loop is blocked. Async: copying the state into
the staging buffer (the write happens in a background thread). Sync: torch.save to
disk. Each mode runs in its own process so peak RSS (ru_maxrss) is measured cleanly,
as growth over the RSS after the state was built. Saves are spaced like training
steps would space them (the previous async write finishes before the next save).

    python benchmarks/bench_checkpoint_stall.py [--state-mb 400] [--saves 5] [--lora]
Target: stall ratio <= 0.2; async extra memory <= about one copy of the state.

``--sharded`` adds FSDP's sharded checkpoints: two gloo ranks under torchrun, an MLP of about
``--state-mb`` of weights + AdamW moments sharded by FSDP2; the stall of the trainer's async
save (CheckpointManager + ShardedFormat: state dict, staging into host memory; DCP writes on
a thread) against a blocking ``dcp.save`` of the same state dict. Target: ratio <= 0.2.

``--lora`` adds what a LoRA model's checkpoint weighs: a Llama-style model (built from a
config, no download) with PEFT LoRA r=16 on every linear layer, after one AdamW step, saved
by the trainer's snapshot as the full state and as the trainable-only format. Target:
trainable-only bytes <= 1.2 x (trainable parameters + AdamW moments) + 2 MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def build_state(state_mb: int, device: str) -> dict:
    import torch

    # Model + two AdamW moments, split into layer-sized tensors like a real state dict.
    numel = state_mb * 1024 * 1024 // 4 // 3
    layers = 16
    make = lambda: {f"layer{i}": torch.randn(numel // layers, device=device) for i in range(layers)}  # noqa: E731
    return {"model": make(), "optimizer": {"exp_avg": make(), "exp_avg_sq": make()}, "step": 1}


def worker(mode: str, state_mb: int, saves: int, device: str, out_dir: str) -> dict:
    import torch

    from src.utils.checkpoint_manager import CheckpointManager

    state = build_state(state_mb, device)
    base_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    manager = CheckpointManager(out_dir, keep_last_n=2, async_save=True)
    stalls = []
    for index in range(saves):
        started = time.perf_counter()
        if mode == "async":
            manager.save(state, index)
        else:
            torch.save(state, Path(out_dir) / f"sync_{index % 2}.pt")
        stalls.append(time.perf_counter() - started)
        manager.wait()  # "training" long enough for the write to finish
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"stall_s": statistics.median(stalls), "extra_rss_mb": peak_rss_mb - base_rss_mb}


def sharded_worker(state_mb: int, saves: int, device_type: str, out_dir: str) -> dict | None:
    """One torchrun rank: FSDP2 model + AdamW state of ~state_mb, async vs blocking saves."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn

    from src.checkpoints.sharded_format import ShardedFormat
    from src.trainers.distributed import init_distributed
    from src.trainers.fsdp import shard_model, sharded_state
    from src.utils.checkpoint_manager import CheckpointManager

    info = init_distributed(device_type)
    device = torch.device(device_type, info.local_rank if device_type == "cuda" else None)
    width = int((state_mb * 1024 * 1024 / 4 / 3 / 8) ** 0.5)  # 8 square layers, x3 with AdamW
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(8)]).to(device)
    shard_model(model, info, device, "fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width, device=device)).sum().backward()
    optimizer.step()
    fmt = ShardedFormat(lambda: sharded_state(model, optimizer), info.rank)
    manager = CheckpointManager(
        Path(out_dir) / "async", keep_last_n=2, is_writer=info.is_main, checkpoint_format=fmt
    )
    stalls: dict[str, list[float]] = {"async": [], "blocking": []}
    for index in range(saves):
        dist.barrier()
        started = time.perf_counter()
        state = {**sharded_state(model, optimizer), "step": index}
        manager.save(state, index)
        stalls["async"].append(time.perf_counter() - started)
        manager.wait()  # "training" long enough for the write to finish
        dist.barrier()
        started = time.perf_counter()
        dcp.save(sharded_state(model, optimizer), checkpoint_id=Path(out_dir) / f"dcp_{index}")
        stalls["blocking"].append(time.perf_counter() - started)
    manager.close()
    slowest = {mode: statistics.median(times) for mode, times in stalls.items()}
    gathered: list[dict | None] = [None] * info.world_size
    dist.all_gather_object(gathered, slowest)
    if not info.is_main:
        return None
    # The loop waits for the slowest rank: its stall is the run's.
    return {
        mode: max(item[mode] for item in gathered if item) for mode in ("async", "blocking")
    } | {"ranks": info.world_size, "width": width}


def run_sharded(args: argparse.Namespace) -> dict:
    """Two CPU ranks (gloo), or one rank per GPU up to two (NCCL)."""
    import torch

    ranks = 2 if args.device == "cpu" else max(1, min(2, torch.cuda.device_count()))
    torchrun = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone"]
    return run_mode("sharded", args, launcher=torchrun)


def run_mode(mode: str, args: argparse.Namespace, launcher: list[str] | None = None) -> dict:
    """This script as a worker process (under ``launcher``, e.g. torchrun): its last line."""
    with tempfile.TemporaryDirectory() as out_dir:
        command = [
            sys.executable,
            *(launcher or []),
            __file__,
            "--worker",
            mode,
            "--state-mb",
            str(args.state_mb),
            "--saves",
            str(args.saves),
            "--device",
            args.device,
            "--out",
            out_dir,
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def lora_checkpoint_sizes(out_dir: str) -> None:
    """Bytes of a LoRA model's checkpoint, full state against what trains."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from src.checkpoints import TorchFileFormat, format_for_model
    from src.trainers.distributed import DistInfo
    from src.trainers.snapshot import TrainingParts, take_snapshot
    from src.trainers.train_state import EpochLoss, TrainState

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(LlamaForCausalLM(config), lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model(input_ids=torch.randint(0, 16000, (2, 32)), labels=torch.randint(0, 16000, (2, 32)))[
        "loss"
    ].backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    dist = DistInfo(rank=0, local_rank=0, world_size=1)
    sizes = {}
    trainable_format = format_for_model(model)
    for name, trainable_only, fmt in (
        ("full state", False, TorchFileFormat()),
        ("trainable only", True, trainable_format),
    ):
        parts = TrainingParts(model, optimizer, scheduler, scaler, trainable_only)
        snapshot = take_snapshot(parts, TrainState(), EpochLoss(torch.device("cpu")), dist)
        directory = Path(out_dir) / name.replace(" ", "_")
        directory.mkdir()
        record = fmt.write(directory, 1, snapshot)
        sizes[name] = record.size
    trained_bytes = sum(p.numel() * p.element_size() for p in trainable)
    bound = 1.2 * 3 * trained_bytes + 2 * 2**20
    total = sum(p.numel() for p in model.parameters())
    print(
        f"LoRA r=16 all-linear on a {total / 1e6:.1f}M-parameter Llama: "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable"
    )
    full, small = sizes["full state"], sizes["trainable only"]
    print(
        f"checkpoint: full state {full / 1e6:.2f} MB, trainable only {small / 1e6:.2f} MB = "
        f"{full / small:.1f}x smaller; bound 1.2 x (params + moments) + 2 MB = "
        f"{bound / 1e6:.2f} MB: {'within' if small <= bound else 'OVER'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=int, default=400)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=["sync", "async", "sharded"])
    parser.add_argument("--out")
    parser.add_argument("--lora", action="store_true", help="also a LoRA model's checkpoint size")
    parser.add_argument("--sharded", action="store_true", help="also FSDP's sharded DCP saves")
    parser.add_argument("--sharded-only", action="store_true", help="only the sharded saves")
    args = parser.parse_args()
    if args.worker == "sharded":
        result = sharded_worker(args.state_mb, args.saves, args.device, args.out)
        if result is not None:
            print(json.dumps(result))
        return
    if args.sharded or args.sharded_only:
        sharded = run_sharded(args)
        print(
            f"sharded (FSDP2, {sharded['ranks']} {args.device} rank(s), state {args.state_mb} MB, "
            f"median "
            f"of {args.saves}): async save() stall {sharded['async']:.3f} s, blocking "
            f"dcp.save {sharded['blocking']:.3f} s, ratio "
            f"{sharded['async'] / sharded['blocking']:.3f}  (target <= 0.2)"
        )
        if args.sharded_only:
            return
    if args.worker:
        print(json.dumps(worker(args.worker, args.state_mb, args.saves, args.device, args.out)))
        return
    sync, async_ = run_mode("sync", args), run_mode("async", args)
    print(f"state {args.state_mb} MB on {args.device}, median of {args.saves} saves")
    for name, result in (("sync torch.save", sync), ("async save()", async_)):
        print(
            f"{name:<16} stall {result['stall_s']:.3f} s   "
            f"extra peak RSS {result['extra_rss_mb']:.0f} MB"
        )
    print(f"stall ratio async/sync {async_['stall_s'] / sync['stall_s']:.3f}  (target <= 0.2)")
    print(
        f"async extra memory / state size {async_['extra_rss_mb'] / args.state_mb:.2f}  "
        f"(target <= ~1.0: one staging copy)"
    )
    if args.lora:
        with tempfile.TemporaryDirectory() as out_dir:
            lora_checkpoint_sizes(out_dir)


if __name__ == "__main__":
    main()
