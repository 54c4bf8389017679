#!/usr/bin/env python3
"""Manage Vast.ai instances from your laptop (logic: src/cloud/vast/; docs/vast_and_sync.md).

    python scripts/launch_vast.py status [--all] [--json]
    python scripts/launch_vast.py search --gpu "RTX 4090" --max-price 0.6 --min-disk 100
    python scripts/launch_vast.py create OFFER_ID --disk 100 [--bid 0.3] [--wait] [--autostop 20]
    python scripts/launch_vast.py ssh-config ID [--alias NAME]
    python scripts/launch_vast.py destroy ID [--remote-dir DIR] [--force]   # refused until
                                             # DIR (SYNC_REMOTE_DIR) is synced and verified
    python scripts/launch_vast.py stop ID | start ID

The API key comes from VASTAI_API_KEY / VAST_API_KEY (environment or .env) or the vastai
CLI's key file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.cloud.vast.cli import main

if __name__ == "__main__":
    sys.exit(main())
