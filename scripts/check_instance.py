#!/usr/bin/env python3
"""Measure this machine (GPU, PCIe, NCCL, disk, S3) against what it promises.

python scripts/check_instance.py [--json PATH] [--quick] [--min-gpu-efficiency 0.8]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.cloud.registry import offer_claims_here
from src.telemetry.instance_check import main

if __name__ == "__main__":
    sys.exit(main(offer_claims=offer_claims_here))
