"""The download manifest: which files a sync brought home, with size and sha256 of each.

Defined once here because two things depend on it: ``scripts/sync_outputs.sh`` writes it after
checking every file against the remote, and ``launch_vast.py destroy`` refuses to delete an
instance unless its manifest still matches both the remote and the local copies. The remote
side is listed by one SSH command (GNU ``find -printf`` and ``sha256sum -z``, which needs GNU
coreutils >= 8.30: Debian 10+, Ubuntu 20.04+), so no Python is needed on the instance.

Symlinks are followed on both sides (``find -L`` here, ``rsync --copy-links`` in the sync):
a ``run1 -> /elsewhere`` link holding a checkpoint is listed, downloaded and verified as the
files it points to, never skipped as "not a regular file".

Manifests live outside the synced tree, one per (host, port, remote dir), under
``SYNC_MANIFEST_DIR`` (default ``$XDG_STATE_HOME/gpu-train-kit/manifests``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from src.utils.atomic_io import atomic_write_bytes, sha256_file

MANIFEST_VERSION = 1
MANIFEST_DIR_ENV = "SYNC_MANIFEST_DIR"
_HASH_LINE = re.compile(r"^([0-9a-f]{64}) [ *]\./(.*)$", re.DOTALL)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the synced directory, '/'-separated
    size: int
    sha256: str


@dataclass
class Manifest:
    """One sync: where from, where to, the files, and whether they all matched."""

    host: str  # as the user gave it (ssh alias or user@host)
    ssh_hostname: str  # resolved by `ssh -G`, what destroy matches against the instance
    ssh_port: int
    ssh_user: str
    remote_dir: str
    local_dir: str
    files: list[FileEntry]
    verified: bool
    created_at: float = field(default_factory=time.time)
    mismatches: list[str] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_bytes"] = self.total_bytes
        return data


def build_local_entries(root: Path, relative_paths: Iterable[str] | None = None) -> list[FileEntry]:
    """Entries for ``relative_paths`` under ``root`` (all regular files when None).

    A listed file that is missing or not a regular file gets size -1 and an empty hash, so
    comparing reports it instead of raising halfway through.
    """
    root = Path(root)
    if relative_paths is None:
        relative_paths = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not p.is_symlink()
        )
    entries = []
    for relative in relative_paths:
        path = root / relative
        if path.is_file() and not path.is_symlink():
            entries.append(FileEntry(relative, path.stat().st_size, sha256_file(path)))
        else:
            entries.append(FileEntry(relative, -1, ""))
    return entries


def _cd_or_exit_3(remote_dir: str) -> str:
    quoted = shlex.quote(remote_dir)
    return f"cd -- {quoted} 2>/dev/null || {{ echo 'no such directory: '{quoted} >&2; exit 3; }}; "


def remote_listing_command(remote_dir: str) -> str:
    """Shell command (run through ssh) printing size and sha256 of every file, NUL-separated.

    ``-L`` follows symlinks, as ``rsync --copy-links`` does, so a linked folder's files are
    listed (and must be home) like any other. Exit status 3 means the directory does not exist.
    """
    return (
        _cd_or_exit_3(remote_dir) + "find -L . -type f -printf 'S %s %P\\0' && "
        "find -L . -type f -exec sha256sum -z -- {} +"
    )


def remote_link_check_command(remote_dir: str) -> str:
    """Shell command printing every dangling symlink under ``remote_dir`` (NUL-separated).

    Under ``find -L`` only a link that points nowhere still has type ``l``; a symlink loop makes
    find fail with "File system loop detected". Both would break ``rsync --copy-links`` (a loop
    is copied 40 levels deep), so the sync checks first. Exit status 3: no such directory.
    """
    return _cd_or_exit_3(remote_dir) + "find -L . -type l -printf '%P\\0'"


def normalize_remote_dir(remote_dir: str) -> str:
    """``/workspace/persistent/`` and ``/workspace//persistent`` are the same directory."""
    return posixpath.normpath(remote_dir.strip()) if remote_dir.strip() else ""


def covers(synced_dir: str, outputs_root: str) -> bool:
    """Whether a sync of ``synced_dir`` includes everything under ``outputs_root``."""
    synced, root = normalize_remote_dir(synced_dir), normalize_remote_dir(outputs_root)
    if not synced or not root:
        return False
    return root == synced or root.startswith(synced.rstrip("/") + "/")


def parse_remote_listing(output: bytes) -> list[FileEntry]:
    """Join the size and hash records of ``remote_listing_command``; ValueError if inconsistent."""
    sizes: dict[str, int] = {}
    hashes: dict[str, str] = {}
    for record in output.split(b"\0"):
        if not record:
            continue
        text = record.decode("utf-8", errors="surrogateescape")
        if text.startswith("S "):
            size, _, path = text[2:].partition(" ")
            sizes[path] = int(size)
            continue
        match = _HASH_LINE.match(text)
        if not match:
            raise ValueError(f"unexpected line in the remote listing: {text[:80]!r}")
        hashes[match.group(2)] = match.group(1)
    if sizes.keys() != hashes.keys():
        changed = sorted(sizes.keys() ^ hashes.keys())[0]
        raise ValueError(f"remote file {changed} appeared or vanished while it was being listed")
    return [FileEntry(path, sizes[path], hashes[path]) for path in sorted(sizes)]


def compare_entries(expected: Iterable[FileEntry], actual: Iterable[FileEntry]) -> list[str]:
    """One line per file that differs (missing, size, checksum); empty when all match."""
    actual_by_path = {entry.path: entry for entry in actual}
    problems = []
    for entry in expected:
        other = actual_by_path.get(entry.path)
        if other is None or other.size < 0:
            problems.append(f"{entry.path}: missing")
        elif other.size != entry.size:
            problems.append(f"{entry.path}: size {other.size} != {entry.size}")
        elif other.sha256 != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs")
    return problems


def manifest_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get(MANIFEST_DIR_ENV):
        return Path(environ[MANIFEST_DIR_ENV]).expanduser()
    state_home = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "gpu-train-kit" / "manifests"


def manifest_path(directory: Path, user: str, hostname: str, port: int, remote_dir: str) -> Path:
    safe_host = re.sub(r"[^A-Za-z0-9._-]", "_", f"{user}@{hostname}")
    remote_tag = hashlib.sha1(remote_dir.rstrip("/").encode()).hexdigest()[:12]
    return directory / f"{safe_host}_{port}_{remote_tag}.json"


def write_manifest(manifest: Manifest, path: Path) -> Path:
    """Atomic: a reader sees the old manifest or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(manifest.to_json(), indent=1).encode())
    return path


def read_manifest(path: Path) -> Manifest:
    """ValueError with one line when the file is not a manifest this code wrote."""
    try:
        data = json.loads(Path(path).read_text())
        files = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"]]
        return Manifest(
            host=str(data["host"]),
            ssh_hostname=str(data["ssh_hostname"]),
            ssh_port=int(data["ssh_port"]),
            ssh_user=str(data["ssh_user"]),
            remote_dir=str(data["remote_dir"]),
            local_dir=str(data["local_dir"]),
            files=files,
            verified=bool(data["verified"]),
            created_at=float(data.get("created_at", 0.0)),
            mismatches=[str(m) for m in data.get("mismatches", [])],
            version=int(data.get("version", MANIFEST_VERSION)),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a readable download manifest ({error})") from None


def find_manifests(directory: Path, hostname: str, port: int) -> list[tuple[Path, Manifest]]:
    """Manifests of syncs from ``hostname:port``; unreadable files are skipped, not fatal."""
    found = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            manifest = read_manifest(path)
        except ValueError:
            continue
        if manifest.ssh_hostname == hostname and manifest.ssh_port == int(port):
            found.append((path, manifest))
    return found


def verify_local(manifest: Manifest) -> list[str]:
    """Re-hash the local copies listed in the manifest; the problems, or an empty list."""
    local = build_local_entries(Path(manifest.local_dir), [e.path for e in manifest.files])
    return compare_entries(manifest.files, local)
