"""A stand-in experiment for sweep tests: stdlib only, starts in milliseconds.

Honours the template experiment's contract: ``[--config PATH] key=value ...``; the run
directory is ``<paths.output_dir>/<run_name>/``; ``test_results.json`` appears only on
success; SIGTERM/SIGINT save progress and exit 75; running again resumes. Extra keys:
``x``, ``y`` (the metric is ``(x - 1)**2 + y``), ``steps``, ``step_seconds``, ``fail=true``.
Each attempt appends a line to ``attempts.jsonl`` (pid, CUDA_VISIBLE_DEVICES, first step,
start and end times) so tests can see what really ran.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

EXIT_INTERRUPTED = 75


def parse(argv: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            values["--config"] = args.pop(0)
        elif "=" in arg:
            key, value = arg.split("=", 1)
            values[key] = value
        else:
            print(f"config error: '{arg}' is not key=value", file=sys.stderr)
            raise SystemExit(2)
    return values


def main() -> int:
    values = parse(sys.argv[1:])
    run_dir = Path(values.get("paths.output_dir", ".")) / values.get("run_name", "fake")
    run_dir.mkdir(parents=True, exist_ok=True)
    stop: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))

    progress_path = run_dir / "progress.json"
    step = json.loads(progress_path.read_text())["step"] if progress_path.exists() else 0
    print(f"resuming from step {step}" if step else f"starting {run_dir.name}", flush=True)
    attempt = {
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "first_step": step,
        "start": time.time(),
        "args": sys.argv[1:],
    }
    if values.get("fail") == "true":
        print("boom: failing on purpose", file=sys.stderr)
        return 1
    steps, step_seconds = int(values.get("steps", 5)), float(values.get("step_seconds", 0.05))
    exit_code = 0
    while step < steps:
        time.sleep(step_seconds)
        step += 1
        progress_path.write_text(json.dumps({"step": step}))
        if stop:
            print(f"{stop[0]} received: saved at step {step}", flush=True)
            exit_code = EXIT_INTERRUPTED
            break
    attempt.update(end=time.time(), last_step=step, exit=exit_code)
    with open(run_dir / "attempts.jsonl", "a") as handle:
        handle.write(json.dumps(attempt) + "\n")
    if exit_code:
        return exit_code
    metric = (float(values.get("x", 0)) - 1) ** 2 + float(values.get("y", 0))
    (run_dir / "training_log.json").write_text(json.dumps([{"epoch": 0, "val_loss": metric}]))
    results = {"test_loss": metric, "best_val_loss": metric, "global_step": step}
    (run_dir / "test_results.json").write_text(json.dumps(results))
    print(f"done: best_val_loss {metric}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
