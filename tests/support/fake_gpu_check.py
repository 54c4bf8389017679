"""scripts/check_instance.py with a fake GPU: its bf16 share of an H100's peak is
``FAKE_GPU_EFFICIENCY`` (default 0.9), so a test can hand one rented machine a weak GPU.

Run in the synced repo as ``python tests/support/fake_gpu_check.py ARGS...`` (the same
arguments as the script); everything but the GPU is measured for real.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the synced repo on the "host"
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))

from src.telemetry import instance_check  # noqa: E402
from src.telemetry.gpu_peaks import peak_for  # noqa: E402

GPU_NAME = "NVIDIA H100 80GB HBM3"
real_run_checks = instance_check.run_checks


def run_checks_with_a_fake_gpu(*args: Any, **kwargs: Any) -> instance_check.Report:
    report = real_run_checks(*args, **kwargs)
    share = float(os.environ.get("FAKE_GPU_EFFICIENCY", "0.9"))
    peak = peak_for(GPU_NAME)
    assert peak is not None
    report.notes.clear()
    report.gpus.append({"index": 0, "name": GPU_NAME, "bf16_tflops": share * peak.bf16_tflops})
    return report


instance_check.run_checks = run_checks_with_a_fake_gpu

if __name__ == "__main__":
    sys.exit(instance_check.main(sys.argv[1:]))
