"""`make gpu-check`: on a GPU box, every GPU test, the instance check and the GPU rows of the
benchmarks in one go, written down as one JSON report and one Markdown table.

    python benchmarks/gpu_check.py [--out benchmarks/results] [--budget-s 480]

Steps run in order, each with its own time limit and each recorded even when it fails; the
report is rewritten after every step, so a box that is taken away mid-way still leaves what
was measured. Installs only what is not importable (a GPU image's torch stays) and lets pip
read ``PIP_FIND_LINKS`` (a folder of wheels on a box without internet). Without a GPU it says
so and exits 1 at once. Paste the Markdown table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# (importable module, what pip installs when it is missing)
NEEDED = [
    ("omegaconf", "omegaconf>=2.3"),
    ("dotenv", "python-dotenv>=1.0"),
    ("boto3", "boto3>=1.28"),
    ("pynvml", "nvidia-ml-py>=12.535"),
    ("tensorboard", "tensorboard>=2.14"),
    ("tqdm", "tqdm>=4.66"),
    ("rich", "rich>=13.0"),
    ("pytest", "pytest>=8.0"),
    ("transformers", "transformers>=4.56"),  # the LLM (LoRA) tests and the SFT benchmark
    ("peft", "peft>=0.13"),
    ("bitsandbytes", "bitsandbytes>=0.43"),  # QLoRA's 4-bit test
]


def steps(out: Path, has_wandb: bool, gpus: int) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each step, in the order they run."""
    bench = REPO_ROOT / "benchmarks"
    plan = [
        (
            "check_instance",
            [PY, "scripts/check_instance.py", "--json", str(out / "check_instance.json")],
            120,
        ),
        (
            "pytest -m gpu",
            [
                PY,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:benchmark",
                "--continue-on-collection-errors",
                "-q",
                "-rs",
                f"--junitxml={out / 'pytest_gpu.xml'}",
            ],
            300,
        ),
        (
            "step overhead",
            [PY, str(bench / "bench_step_overhead.py"), "--steps", "300", "--repeats", "3"],
            150,
        ),
        (
            "checkpoint stall",
            [PY, str(bench / "bench_checkpoint_stall.py"), "--device", "cuda", "--lora"],
            90,
        ),
        (
            "sharded checkpoint stall",
            [PY, str(bench / "bench_checkpoint_stall.py"), "--device", "cuda", "--sharded-only"],
            90,
        ),
        ("SIGTERM latency", [PY, str(bench / "bench_sigterm_latency.py")], 90),
        (
            "monitoring overhead",
            [PY, str(bench / "bench_monitoring_overhead.py"), "--steps", "2000", "--repeats", "3"]
            + ([] if has_wandb else ["--no-wandb"]),
            150,
        ),
        (
            "HF Trainer overhead",
            [PY, str(bench / "bench_hf_trainer.py"), "--steps", "150", "--repeats", "3"],
            150,
        ),
    ]
    if gpus >= 2:
        plan.append(("DDP/NCCL", [PY, str(bench / "bench_ddp.py"), "--repeats", "2"], 150))
    return plan


def install_missing() -> list[str]:
    """pip-install only the modules that are not importable; returns what it installed."""
    missing = [spec for module, spec in NEEDED if importlib.util.find_spec(module) is None]
    if missing:
        print(f"[gpu-check] installing {' '.join(missing)} (PIP_FIND_LINKS is honoured)")
        subprocess.run([PY, "-m", "pip", "install", "-q", *missing], check=True)
    return missing


def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return len([line for line in listing.stdout.splitlines() if line.startswith("GPU ")])


def headline(output: str) -> str:
    """The lines a benchmark prints as its result (ratios, targets, pass/fail counts)."""
    keep = re.compile(r"ratio|target|passed|failed|skipped|error|verdict|\[check\]|LOW|ok ", re.I)
    lines = [line.rstrip() for line in output.splitlines() if keep.search(line)]
    return "\n".join(lines[-12:])


def pytest_result(output: str) -> str:
    """pytest's exit 1 when no GPU test failed, only modules that hold no GPU test could
    not be collected (a package such as jupytext missing on the box): ok, with a note."""
    summary = next((ln for ln in reversed(output.splitlines()) if " in " in ln), "")
    uncollected = output.count("ERROR collecting")
    if "failed" in summary or not uncollected or " error" not in summary:
        return "exit 1"
    return f"ok ({uncollected} module(s) without GPU tests not collected: missing packages)"


def markdown(report: dict) -> str:
    rows = [
        f"# GPU check: {report['gpu']} ({report['date']})",
        "",
        f"torch {report['torch']}, {report['gpus']} GPU(s), {report['total_s']:.0f} s in all.",
        "",
        "| step | result | seconds | headline |",
        "|---|---|---|---|",
    ]
    for step in report["steps"]:
        cell = step["headline"].replace("|", "/").replace("\n", "<br>")
        rows.append(f"| {step['name']} | {step['result']} | {step['seconds']:.0f} | {cell} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip steps past this")
    args = parser.parse_args()
    gpus = gpu_count()
    if gpus == 0:
        print("[gpu-check] no NVIDIA GPU here (nvidia-smi finds none): run it on a GPU box")
        return 1
    installed = install_missing()
    import torch  # after the install: the image's own torch, never reinstalled

    if not torch.cuda.is_available():
        print("[gpu-check] nvidia-smi sees a GPU but torch.cuda cannot use it: check the driver")
        return 1
    name = torch.cuda.get_device_name(0)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%MZ")
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    json_path = args.out / f"gpu_check_{slug}_{stamp}.json"
    report = {
        "gpu": name,
        "gpus": gpus,
        "torch": torch.__version__,
        "date": stamp,
        "installed": installed,
        "steps": [],
        "total_s": 0.0,
    }
    began = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    has_wandb = importlib.util.find_spec("wandb") is not None
    for step_name, command, limit in steps(args.out, has_wandb, gpus):
        left = args.budget_s - (time.monotonic() - began)
        if left < 20:
            report["steps"].append(
                {
                    "name": step_name,
                    "result": "not run (budget)",
                    "seconds": 0.0,
                    "headline": "",
                    "output": "",
                }
            )
            continue
        print(f"[gpu-check] {step_name} (limit {min(limit, left):.0f} s)", flush=True)
        started = time.monotonic()
        try:
            done = subprocess.run(
                command,
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=min(limit, left),
            )
            output, result = (
                done.stdout + done.stderr,
                ("ok" if done.returncode == 0 else f"exit {done.returncode}"),
            )
        except subprocess.TimeoutExpired as expired:
            output = (
                (expired.stdout or b"").decode()
                if isinstance(expired.stdout, bytes)
                else (expired.stdout or "")
            )
            result = "timed out"
        if step_name == "pytest -m gpu" and result == "exit 1":
            result = pytest_result(output)
        step = {
            "name": step_name,
            "result": result,
            "seconds": time.monotonic() - started,
            "headline": headline(output),
            "output": output[-20000:],
        }
        report["steps"].append(step)
        print(step["headline"], flush=True)
        report["total_s"] = time.monotonic() - began
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        json_path.with_suffix(".md").write_text(markdown(report))
    print(f"[gpu-check] report: {json_path} and {json_path.with_suffix('.md')}")
    return 0 if all(step["result"].startswith("ok") for step in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
