"""The download manifest: which files a sync brought home, with size and sha256 of each.

Defined once here because two things depend on it: ``scripts/sync_outputs.sh`` writes it after
checking every file against the remote, and ``launch_vast.py destroy`` refuses to delete an
instance unless its manifest still matches both the remote and the local copies. The remote
side is listed by SSH commands (GNU ``find -printf`` and ``sha256sum -z``, which needs GNU
coreutils >= 8.30: Debian 10+, Ubuntu 20.04+), so no Python is needed on the instance.

Symlinks are followed on both sides (``find -L`` here, ``rsync --copy-links`` in the sync):
a ``run1 -> /elsewhere`` link holding a checkpoint is listed, downloaded and verified as the
files it points to, never skipped as "not a regular file".

Manifests live outside the synced tree, one per (host, port, remote dir), under
``SYNC_MANIFEST_DIR`` (default ``$XDG_STATE_HOME/gpu-train-kit/manifests``).

Hashing every byte on both sides on every sync makes a re-sync of a 100 GB run directory
cost minutes. Beside each manifest, a hash cache (``<manifest>.hashes``) remembers each
file's sha256 together with the file's stat key on that side (size, mtime, ctime, inode,
device). A hash is reused only while that key is unchanged; anything rsync moved, training
rewrote or someone edited gets a new inode, mtime or ctime and is hashed again. ctime cannot
be set back by ``touch``, so an in-place edit with its mtime forced back is still re-hashed.
``verify_all`` (``sync_outputs.sh --verify-all``) ignores the cache and hashes everything,
for what no stat can see (a disk that rots bits in place).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from src.common.atomic_io import atomic_write_bytes, sha256_file

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


@dataclass(frozen=True)
class CachedHash:
    """A sha256 and the stat key of the file when it was hashed (opaque, compared as is)."""

    stat_key: str
    sha256: str


HashTable = dict[str, CachedHash]  # relative path -> cached hash, one per side


def local_stat_key(stat: os.stat_result) -> str:
    """Size, mtime, ctime, inode, device: any write, rename or utime changes one of them."""
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}:{stat.st_dev}"


def hash_local_files(
    root: Path, relative_paths: Iterable[str], cache: HashTable | None = None
) -> tuple[list[FileEntry], HashTable, int]:
    """(entries, refreshed cache, files hashed): a cached sha256 is reused while the file's
    stat key is unchanged; every other file is read. A file that is missing or not a regular
    file gets size -1 and an empty hash, so comparing reports it instead of raising."""
    root = Path(root)
    cache = cache or {}
    entries, fresh, hashed = [], {}, 0
    for relative in relative_paths:
        path = root / relative
        try:
            before = path.stat() if not path.is_symlink() else None
        except OSError:
            before = None
        if before is None or not path.is_file():
            entries.append(FileEntry(relative, -1, ""))
            continue
        key = local_stat_key(before)
        cached = cache.get(relative)
        if cached is not None and cached.stat_key == key:
            digest = cached.sha256
        else:
            digest = sha256_file(path)
            hashed += 1
            if local_stat_key(path.stat()) != key:
                # Written to while it was read: report this hash, but never reuse it.
                entries.append(FileEntry(relative, before.st_size, digest))
                continue
        fresh[relative] = CachedHash(key, digest)
        entries.append(FileEntry(relative, before.st_size, digest))
    return entries, fresh, hashed


def build_local_entries(
    root: Path, relative_paths: Iterable[str] | None = None, cache: HashTable | None = None
) -> list[FileEntry]:
    """Entries for ``relative_paths`` under ``root`` (all regular files when None).

    A listed file that is missing or not a regular file gets size -1 and an empty hash, so
    comparing reports it instead of raising halfway through. ``cache``: see hash_local_files.
    """
    root = Path(root)
    if relative_paths is None:
        relative_paths = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not p.is_symlink()
        )
    return hash_local_files(root, relative_paths, cache)[0]


def _cd_or_exit_3(remote_dir: str) -> str:
    quoted = shlex.quote(remote_dir)
    return f"cd -- {quoted} 2>/dev/null || {{ echo 'no such directory: '{quoted} >&2; exit 3; }}; "


def remote_stat_command(remote_dir: str) -> str:
    """Shell command printing size and stat key of every file, no hashing.

    ``-L`` follows symlinks, as ``rsync --copy-links`` does, so a linked folder's files are
    listed (and must be home) like any other.

    Record: ``S <size> <mtime> <ctime> <inode> <device> <path>``, NUL-terminated. Exit 3: no
    such directory.
    """
    return _cd_or_exit_3(remote_dir) + "find -L . -type f -printf 'S %s %T@ %C@ %i %D %P\\0'"


def remote_hash_command(remote_dir: str) -> str:
    """Shell command hashing the NUL-separated ``./path`` list it reads on stdin."""
    return _cd_or_exit_3(remote_dir) + "xargs -0 -r sha256sum -z --"


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


def parse_stat_listing(output: bytes) -> dict[str, tuple[int, str]]:
    """{path: (size, stat key)} from ``remote_stat_command``; ValueError on a bad record."""
    listed: dict[str, tuple[int, str]] = {}
    for record in output.split(b"\0"):
        if not record:
            continue
        text = record.decode("utf-8", errors="surrogateescape")
        parts = text.split(" ", 6)
        if len(parts) != 7 or parts[0] != "S" or not parts[1].isdigit():
            raise ValueError(f"unexpected line in the remote listing: {text[:80]!r}")
        listed[parts[6]] = (int(parts[1]), ":".join(parts[1:6]))
    return listed


def parse_hash_listing(output: bytes) -> dict[str, str]:
    """{path: sha256} from ``sha256sum -z`` output of ``./path`` names."""
    hashes: dict[str, str] = {}
    for record in output.split(b"\0"):
        if not record:
            continue
        text = record.decode("utf-8", errors="surrogateescape")
        match = _HASH_LINE.match(text)
        if not match:
            raise ValueError(f"unexpected line in the remote listing: {text[:80]!r}")
        hashes[match.group(2)] = match.group(1)
    return hashes


class RemoteListingError(RuntimeError):
    """The remote could not be listed; ``str()`` is one line, ``ssh_dropped`` says whether
    the connection itself failed (exit 255) rather than the command."""

    def __init__(self, message: str, ssh_dropped: bool = False) -> None:
        super().__init__(message)
        self.ssh_dropped = ssh_dropped


# Runs one shell command on the remote with optional stdin bytes (ssh, or a ControlMaster).
RemoteRunner = Callable[[str, bytes | None], subprocess.CompletedProcess]


def _last_stderr_line(result: subprocess.CompletedProcess) -> str:
    text = result.stderr.decode(errors="replace") if result.stderr else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {result.returncode}"


def list_remote_entries(
    run: RemoteRunner, remote_dir: str, cache: HashTable | None = None
) -> tuple[list[FileEntry], HashTable, int]:
    """(entries, refreshed remote cache, files hashed) for every file under ``remote_dir``.

    One command lists sizes and stat keys; a second hashes only the files whose key is not
    in ``cache`` (all of them when ``cache`` is None or empty). Both ride the caller's SSH.
    Raises RemoteListingError (one line) when the remote cannot be listed.
    """

    def checked(command: str, stdin: bytes | None = None) -> bytes:
        result = run(command, stdin)
        if result.returncode == 255:
            raise RemoteListingError(
                f"SSH dropped while listing the remote: {_last_stderr_line(result)}", True
            )
        if result.returncode == 3:
            raise RemoteListingError(f"remote directory {remote_dir} does not exist")
        if result.returncode != 0:
            raise RemoteListingError(f"remote listing failed: {_last_stderr_line(result)}")
        return result.stdout

    try:
        listed = parse_stat_listing(checked(remote_stat_command(remote_dir)))
    except ValueError as error:
        raise RemoteListingError(str(error)) from None
    cache = cache or {}
    hashes = {
        path: cache[path].sha256
        for path, (_, key) in listed.items()
        if path in cache and cache[path].stat_key == key
    }
    to_hash = [path for path in listed if path not in hashes]
    if to_hash:
        names = b"".join(b"./" + os.fsencode(path) + b"\0" for path in to_hash)
        try:
            fresh = parse_hash_listing(checked(remote_hash_command(remote_dir), names))
        except RemoteListingError as error:
            if error.ssh_dropped:
                raise
            raise RemoteListingError(
                f"remote files changed while they were being listed ({error}): run it again"
            ) from None
        except ValueError as error:
            raise RemoteListingError(str(error)) from None
        missing = [path for path in to_hash if path not in fresh]
        if missing:
            raise RemoteListingError(
                f"remote file {missing[0]} appeared or vanished while it was being listed"
            )
        hashes.update(fresh)
    entries = [FileEntry(path, listed[path][0], hashes[path]) for path in sorted(listed)]
    new_cache = {path: CachedHash(listed[path][1], hashes[path]) for path in listed}
    return entries, new_cache, len(to_hash)


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


def verify_local(manifest: Manifest, cache: HashTable | None = None) -> list[str]:
    """Hash the local copies listed in the manifest (reusing ``cache`` hashes whose stat key
    still matches); the problems, or an empty list."""
    local = build_local_entries(Path(manifest.local_dir), [e.path for e in manifest.files], cache)
    return compare_entries(manifest.files, local)


# -- the hash cache beside each manifest -----------------------------------------------------

HASH_CACHE_VERSION = 1


@dataclass
class HashCache:
    """Both sides' cached hashes for one manifest; valid only for the same two directories."""

    local_dir: str
    remote_dir: str
    local: HashTable = field(default_factory=dict)
    remote: HashTable = field(default_factory=dict)


def hash_cache_path(manifest_file: Path) -> Path:
    """``<manifest>.hashes``: not ``*.json``, so manifest globs never read it."""
    return Path(manifest_file).with_suffix(".hashes")


def read_hash_cache(manifest_file: Path, local_dir: str, remote_dir: str) -> HashCache:
    """The cache for this manifest, or an empty one when missing, unreadable or written for
    other directories (a cache is a speed-up: any doubt means hashing again)."""
    empty = HashCache(str(local_dir), remote_dir)
    try:
        data = json.loads(hash_cache_path(manifest_file).read_text())
        if (
            data.get("version") != HASH_CACHE_VERSION
            or data.get("local_dir") != str(local_dir)
            or data.get("remote_dir") != remote_dir
        ):
            return empty

        def table(name: str) -> HashTable:
            return {str(p): CachedHash(str(k), str(h)) for p, (k, h) in data[name].items()}

        return HashCache(str(local_dir), remote_dir, table("local"), table("remote"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return empty


def write_hash_cache(manifest_file: Path, cache: HashCache) -> None:
    data = {
        "version": HASH_CACHE_VERSION,
        "local_dir": cache.local_dir,
        "remote_dir": cache.remote_dir,
        "local": {p: [c.stat_key, c.sha256] for p, c in cache.local.items()},
        "remote": {p: [c.stat_key, c.sha256] for p, c in cache.remote.items()},
    }
    path = hash_cache_path(manifest_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(data).encode())
