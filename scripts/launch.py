#!/usr/bin/env python3
"""Manage rented machines from your laptop, for any provider (logic: src/cloud/launch.py).

    python scripts/launch.py --provider runpod status [--all] [--json]
    python scripts/launch.py --provider runpod search [--gpu 4090] [--spot] [--cloud community]
    python scripts/launch.py --provider runpod create "NVIDIA GeForce RTX 4090" --volume-gb 100
    python scripts/launch.py --provider runpod ssh-config ID | stop ID | start ID
    python scripts/launch.py --provider runpod terminate ID   # refused until the outputs are
                                                              # synced and verified
    python scripts/launch.py --provider vast ...               # = scripts/launch_vast.py ...

Keys: RUNPOD_API_KEY / VASTAI_API_KEY in the environment or .env (docs/runpod.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.cloud.launch import main

if __name__ == "__main__":
    sys.exit(main())
