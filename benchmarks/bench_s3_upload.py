"""Checkpoint upload through the S3 mirror against a plain boto3 ``upload_file`` of the same
bytes to the same server (moto's S3 server on loopback, real HTTP).

The manager's path: ``CheckpointManager.upload_latest()`` (transfer manager with the mirror's
TransferConfig, sha256 metadata, size and sha256 check in the bucket, manifest written last).
The baseline: ``client.upload_file(path, bucket, key)`` with boto3's defaults. The two
alternate, ``--repeats`` times each; the ratio is baseline time / manager time (1.0: as fast).

    python benchmarks/bench_s3_upload.py [--mb 500] [--repeats 3]
Target: >= 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

BUCKET = "bench-bucket"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="checkpoint size in MB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from benchmarks.s3_server import moto_bucket
    from src.utils.checkpoint_manager import CheckpointManager

    with moto_bucket(BUCKET) as (endpoint, client):
        with tempfile.TemporaryDirectory() as tmp:
            manager = CheckpointManager(
                Path(tmp) / "ckpt",
                async_save=False,
                remote_bucket=BUCKET,
                remote_prefix="bench",
                endpoint_url=endpoint,
                progress=False,
            )
            numel = args.mb * 1024 * 1024 // 4
            manager.save({"model": {"w": torch.randn(numel)}}, step=1)
            info = manager.list_checkpoints()[0]
            print(f"checkpoint: {info.size / 1e6:.0f} MB")
            managed, plain = [], []
            for repeat in range(args.repeats):
                started = time.perf_counter()
                client.upload_file(str(info.path), BUCKET, f"plain/{repeat}.pt")
                plain.append(time.perf_counter() - started)
                client.delete_object(Bucket=BUCKET, Key=f"plain/{repeat}.pt")

                assert manager.mirror is not None
                manager.mirror._remote.clear()  # upload again, as a new checkpoint would
                manager.mirror._uploaded.clear()
                started = time.perf_counter()
                manager.upload_latest()
                managed.append(time.perf_counter() - started)
                print(f"  repeat {repeat}: plain {plain[-1]:.2f} s, manager {managed[-1]:.2f} s")
            manager.close(remote_timeout=60)
    ratio = statistics.median(plain) / statistics.median(managed)
    mb_s = info.size / 1e6 / statistics.median(managed)
    print(
        f"manager {statistics.median(managed):.2f} s ({mb_s:.0f} MB/s) vs plain upload_file "
        f"{statistics.median(plain):.2f} s: ratio {ratio:.2f} (target >= 0.9)"
    )


if __name__ == "__main__":
    main()
