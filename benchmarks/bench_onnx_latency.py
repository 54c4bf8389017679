"""CPU inference latency: onnxruntime (fp32 and int8) against torch eager, same model, same CPU.

The dev-config models, exported the way ``scripts/export_onnx.py`` exports them (the same
specs, exporter and int8 quantization): the template MLP (32 features, 2x64 hidden, 4
classes) and the char LM (2 layers x 64, 4 heads, block 64, the dev corpus's vocabulary; full
64-token inputs). Weights are freshly initialised: latency does not depend on their values.

Per model and batch size (1 and 64), each call is timed on its own; the backends take turns
in rounds (torch, ort fp32, ort int8, torch, ...) so a drifting VM slows them alike. Same
thread count for both (``--threads``, default 1: steady on a shared VM). Printed: p50 and
p99 per backend and the ratio onnxruntime / torch (below 1: onnxruntime is faster).

    python benchmarks/bench_onnx_latency.py [--seconds 0.6] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np
import onnxruntime as ort
import torch

from src.config import DEV_CONFIG, experiment_schema, load_config, to_plain_dict
from src.data.char_text import CharTextDataConfig, build_char_datasets
from src.export.builtin_specs import char_gpt_spec, template_spec
from src.export.onnx.exporters import export_spec
from src.export.onnx.int8 import quantize_int8
from src.export.specs import ExportRun, ExportSpec
from src.models import build_model
from src.models.char_gpt import CharGPT, CharGPTConfig
from src.models.template import load_template_config

BATCH_SIZES = (1, 64)
ROUNDS = 10


def dev_specs() -> dict[str, ExportSpec]:
    """The two dev-config models as ExportSpecs, built by the exporter's own spec builders."""
    template_cfg = load_template_config(DEV_CONFIG)
    torch.manual_seed(0)
    template = build_model(
        template_cfg.model, template_cfg.data.num_features, template_cfg.data.num_classes
    )
    lm_cfg = load_config(
        REPO_ROOT / "configs" / "char_lm_dev.yaml",
        schema=experiment_schema(CharGPTConfig, CharTextDataConfig),
    )
    vocab = build_char_datasets(lm_cfg.data, lm_cfg.model.block_size).vocab
    lm = CharGPT(CharGPTConfig(**lm_cfg.model), vocab_size=len(vocab))
    return {
        "template MLP": template_spec(
            ExportRun(Path("."), to_plain_dict(template_cfg), template.state_dict(), "best")
        ),
        f"char LM (block {lm_cfg.model.block_size})": char_gpt_spec(
            ExportRun(Path("."), to_plain_dict(lm_cfg), lm.state_dict(), "best")
        ),
    }


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed_calls(call: Callable[[], object], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure(spec: ExportSpec, files: dict[str, Path], batch: int, args: argparse.Namespace):
    inputs = spec.make_inputs(batch, None, torch.Generator().manual_seed(1))
    feeds = {name: x.numpy() for name, x in zip(spec.input_names, inputs, strict=True)}
    sessions = {name: session(path, args.threads) for name, path in files.items()}

    def torch_call() -> object:
        with torch.inference_mode():
            return spec.model(*inputs)

    backends: dict[str, Callable[[], object]] = {"torch eager": torch_call}
    for name, ort_session in sessions.items():
        backends[f"ort {name}"] = lambda s=ort_session: s.run(None, feeds)
    for call in backends.values():  # warm-up, and a first estimate of the cost
        timed_calls(call, 3)
    slowest = max(statistics.median(timed_calls(call, 5)) for call in backends.values())
    per_round = max(10, int(args.seconds / ROUNDS / slowest))
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(ROUNDS):
        for name, call in backends.items():
            times[name] += timed_calls(call, per_round)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.6, help="per backend and case")
    parser.add_argument("--threads", type=int, default=1, help="for both (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(
        f"torch {torch.__version__} eager vs onnxruntime {ort.__version__} CPU, "
        f"{args.threads} thread(s) each"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, spec in dev_specs().items():
            fp32, int8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
            exporter, _ = export_spec(spec, fp32)
            quantize_int8(fp32, int8)
            spec.model.eval()
            files = {"fp32": fp32, "int8": int8}
            for batch in BATCH_SIZES:
                times = measure(spec, files, batch, args)
                base50, base99 = (
                    percentile(times["torch eager"], 50),
                    percentile(times["torch eager"], 99),
                )
                print(f"== {model_name}, batch {batch} ({exporter} export)")
                for name, values in times.items():
                    p50, p99 = percentile(values, 50), percentile(values, 99)
                    ratio = "" if name == "torch eager" else f"   ratio {p50 / base50:.2f}x p50"
                    ratio += "" if name == "torch eager" else f", {p99 / base99:.2f}x p99"
                    print(
                        f"  {name:12s} p50 {1e3 * p50:8.3f} ms  p99 {1e3 * p99:8.3f} ms  "
                        f"({len(values)} calls){ratio}"
                    )
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
