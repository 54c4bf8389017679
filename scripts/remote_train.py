#!/usr/bin/env python3
"""Train on any SSH host from your laptop, in one command (logic: src/remote/, docs: README).

    python scripts/remote_train.py HOST experiments/template_experiment.py trainer.max_steps=5000
    python scripts/remote_train.py HOST experiments/a.py --also experiments/b.py run_name=b
    python scripts/remote_train.py HOST --status | --attach RUN_NAME | --monitor
    python scripts/remote_train.py HOST experiments/x.py --destroy-after   # Vast.ai
    python scripts/remote_train.py --rent --gpu "RTX 4090" experiments/x.py checkpoint.s3_bucket=B
    #   (rent the cheapest fitting offer, check it, train, bring home, destroy; docs: README)
    python scripts/remote_train.py --rented   # the machines --rent holds, with their cost

Stages: connect, sync, install, train (detached in tmux, streamed), retrieve, verify,
shutdown. Exit codes: 0 done, 2 bad input, 10-16 the stage that failed (in that order; 17
export, 18 check, 19 rent), 75 a run was interrupted (outputs home, instance left running),
130 detached by Ctrl-C.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.remote.cli import main

if __name__ == "__main__":
    sys.exit(main())
