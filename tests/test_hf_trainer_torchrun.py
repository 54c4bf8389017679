"""``run_interruptible`` under ``torchrun``: two gloo ranks of a real ``transformers.Trainer``.

SIGTERM reaches one rank only (a node's OOM killer, a user's ``kill``): at the next step end
both ranks agree, the Trainer saves one checkpoint (each rank's RNG file in it, the record
written last by rank 0 after every rank's part), and both exit 75. The same command resumes
from that checkpoint and finishes, each step logged once, and ends with the weights of an
uninterrupted two-rank run (started beside the first), bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.common.signals import EXIT_INTERRUPTED
from src.integrations.hf_checkpoints import RECORD_NAME

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "support" / "hf_trainer_script.py"
MAX_STEPS = 12
TIMEOUT_S = 180
# torchrun's failure report: one block per failed rank.
RANK_EXIT = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def torchrun(output_dir: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(output_dir),
        f"max_steps={MAX_STEPS}",
        "save_steps=4",
        *options,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_sigterm_to_one_rank_stops_both_at_one_step_and_the_rerun_resumes(
    tmp_path: Path,
) -> None:
    output_dir = tmp_path / "out"
    reference = subprocess.Popen(  # uninterrupted, beside the first run
        torchrun(tmp_path / "reference"),
        cwd=REPO_ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    process = subprocess.Popen(
        torchrun(output_dir, "step_sleep_s=0.3"),
        cwd=REPO_ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    pids: dict[str, int] = {}
    seen = []
    for line in process.stdout:
        seen.append(line)
        # Both ranks share the pipe: two prints can land on one line ("step 2step 2").
        pids.update((rank, int(pid)) for rank, pid in re.findall(r"rank (\d) pid (\d+)", line))
        if "1" in pids and re.search(r"step ([2-9]|1\d)", line):
            os.kill(pids["1"], signal.SIGTERM)  # rank 1 alone; rank 0 never sees a signal
            break
    rest, _ = process.communicate(timeout=TIMEOUT_S)
    output = "".join(seen) + rest

    exits = dict(RANK_EXIT.findall(output))
    assert exits == {"0": str(EXIT_INTERRUPTED), "1": str(EXIT_INTERRUPTED)}, output
    saved = re.findall(r"saved checkpoint-(\d+); run the same command again", output)
    assert len(saved) == 1, output  # rank 0 alone says so
    step = int(saved[0])
    assert 2 <= step < MAX_STEPS, output
    record = json.loads((output_dir / f"checkpoint-{step}" / RECORD_NAME).read_text())
    names = {Path(entry["name"]).name for entry in record["files"]}
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= names, names
    assert not (output_dir / "result.json").exists()

    resumed = subprocess.run(
        torchrun(output_dir),
        cwd=REPO_ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text
    assert text.count(f"resuming from {output_dir / f'checkpoint-{step}'}") == 1, text
    result = json.loads((output_dir / "result.json").read_text())
    assert result["status"] == "completed"
    assert result["steps"] == list(range(1, MAX_STEPS + 1))  # each step once, across both runs

    reference_output, _ = reference.communicate(timeout=TIMEOUT_S)
    assert reference.returncode == 0, reference_output
    expected = torch.load(tmp_path / "reference" / "final_weights.pt", weights_only=True)
    resumed_weights = torch.load(output_dir / "final_weights.pt", weights_only=True)
    for name, tensor in expected.items():  # both ranks' data, each sample once: bit for bit
        assert torch.equal(tensor, resumed_weights[name]), name
