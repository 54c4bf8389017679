"""Re-sync of an unchanged output tree against the first full sync: bytes and time.

A local OpenSSH server on 127.0.0.1 (the same fixture the tests use) plays the instance;
the sync is the real one (`src.storage.output_sync.sync_outputs`: ControlMaster SSH, rsync,
remote listing, sha256 on both sides, manifest). Three syncs of the same tree: the first
into an empty folder, a re-sync with nothing changed (hashes reused from the hash cache for
files whose size, mtime, ctime and inode are unchanged), and a re-sync with `verify_all`
(every byte hashed again on both sides: what every re-sync cost before the cache).
Targets: the re-sync moves < 1% of the tree's bytes, and takes <= 0.1x the first sync's time.
Each timing ends with os.sync(), so each sync pays for writing its own data to disk.

    python benchmarks/bench_resync.py                 # 1 GB tree (the issue's figure)
    python benchmarks/bench_resync.py --size-mb 64    # quick
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from src.storage.output_sync import sync_outputs
from tests.support.sshd import start_sshd


def write_tree(root: Path, total_bytes: int, files: int) -> None:
    """Checkpoint-like files of random bytes (rsync can't compress them away), plus logs."""
    per_file = total_bytes // files
    for index in range(files):
        path = root / f"run{index % 3}" / "checkpoints" / f"step_{index:05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            left = per_file if index < files - 1 else total_bytes - per_file * (files - 1)
            while left:
                chunk = min(left, 8 << 20)
                handle.write(os.urandom(chunk))
                left -= chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024.0, help="tree size (default 1 GB)")
    parser.add_argument("--files", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-resync-") as tmp:
        tmp_path = Path(tmp)
        server, process = start_sshd(tmp_path / "sshd")
        try:
            remote = tmp_path / "remote"
            write_tree(remote, int(args.size_mb * (1 << 20)), args.files)
            environ = {
                "SYNC_SSH_OPTS": shlex.join(server.ssh_options()),
                "SYNC_MANIFEST_DIR": str(tmp_path / "manifests"),
            }
            rows = []
            for label, verify_all in (
                ("first full sync", False),
                ("re-sync, unchanged", False),
                ("re-sync, --verify-all", True),
            ):
                start = time.perf_counter()
                result = sync_outputs(
                    server.target,
                    tmp_path / "local",
                    str(remote),
                    server.port,
                    environ,
                    False,
                    verify_all,
                )
                # Each sync pays for its own writeback: without this, the first sync's
                # gigabyte is flushed during the next sync's first fsync (the manifest's).
                os.sync()
                seconds = time.perf_counter() - start
                stats, tree = result.stats, result.manifest.total_bytes
                rows.append((label, stats.wire_bytes, tree, result.files_hashed, seconds))
        finally:
            process.terminate()
            process.wait()
    print(f"tree: {args.size_mb:g} MB in {args.files} files (incl. verify and manifest)")
    header = f"{'':24} {'wire bytes':>14} {'tree bytes':>14} {'ratio':>10}"
    print(f"{header} {'files hashed':>13} {'time':>8}")
    for label, wire, tree, hashed, seconds in rows:
        sizes = f"{wire:14,d} {tree:14,d} {wire / tree:10.5%}"
        print(f"{label:24} {sizes} {hashed:13d} {seconds:7.2f}s")
    ratio = rows[1][1] / rows[1][2]
    print(f"re-sync / tree = {ratio:.5%} (target < 1%): {'OK' if ratio < 0.01 else 'MISSED'}")
    print(f"re-sync wire bytes / first sync wire bytes = {rows[1][1] / rows[0][1]:.6f}")
    time_ratio = rows[1][4] / rows[0][4]
    verdict = "OK" if time_ratio <= 0.1 else "MISSED"
    print(f"re-sync time / first sync time = {time_ratio:.3f}x (target <= 0.1x): {verdict}")
    print(f"--verify-all re-sync time / first sync time = {rows[2][4] / rows[0][4]:.3f}x")


if __name__ == "__main__":
    main()
