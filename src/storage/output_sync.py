"""Download a remote output directory over SSH, verify every byte, record it, mirror it to S3.

``scripts/sync_outputs.sh`` is a thin wrapper around ``main()``. The stages and why:

- connect: one SSH master connection (ControlMaster), reused by rsync and the checksum step,
  so a password-less key is asked once and the handshake is paid once;
- transfer: ``rsync -a --copy-links --partial`` (an interrupted sync resumes; unchanged files
  are skipped by size+mtime, so a re-sync moves almost nothing). Symlinks are followed, as the
  verify listing (``find -L``) does, so a ``run1 -> /elsewhere`` link's files come home; a
  dangling link or a link loop stops the sync first with one line naming it;
- verify: sizes and sha256 of every remote file, computed on the remote, are compared with
  the local copies; the manifest is written either way, ``verified`` says which. rsync's
  quick check trusts mtimes, so this is what catches a file that changed remotely after it
  was sent, or a local copy that rotted. A hash is reused while the file's stat key (size,
  mtime, ctime, inode) is unchanged on its side (``manifest.HashCache``), so a re-sync hashes
  only what rsync moved or training rewrote; ``--verify-all`` hashes everything again;
- upload (only with ``S3_BUCKET``): the verified files go to S3 (``S3_PREFIX``,
  ``S3_ENDPOINT_URL``).

Each failure prints ``sync_outputs: <stage> failed: ...`` and exits with the stage's code.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from src.common.paths import tools_dotenv_path
from src.storage.manifest import (
    FileEntry,
    HashCache,
    Manifest,
    RemoteListingError,
    compare_entries,
    hash_local_files,
    list_remote_entries,
    manifest_dir,
    manifest_path,
    read_hash_cache,
    remote_link_check_command,
    write_hash_cache,
    write_manifest,
)
from src.storage.s3 import S3SyncError, error_line, make_client, object_key, upload_directory

EXIT_USAGE = 2
STAGE_EXIT = {"connect": 10, "transfer": 11, "verify": 12, "upload": 13}
SSH_OPTS_ENV = "SYNC_SSH_OPTS"  # extra ssh options, e.g. "-i ~/.ssh/vast -o ..."
RSYNC_PATH_ENV = "SYNC_RSYNC_PATH"  # rsync on the remote, e.g. "sudo rsync"
REMOTE_DIR_ENV = "SYNC_REMOTE_DIR"
DEFAULT_REMOTE_DIR = "/workspace/persistent"  # the outputs root destroy protects
CONNECT_TIMEOUT_S = 15


class SyncError(RuntimeError):
    """A failed stage; ``str()`` is the one line shown to the user. ``reason`` is that line
    without the stage, ``detail`` the whole stderr of ssh when a connection failed (callers
    that explain SSH failures read it: the last line alone can hide a changed host key)."""

    def __init__(self, stage: str, message: str, detail: str = "") -> None:
        super().__init__(f"{stage} failed: {message}")
        self.stage = stage
        self.reason = message
        self.detail = detail


@dataclass
class TransferStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    total_file_size: int = 0
    transferred_file_size: int = 0
    files_transferred: int = 0

    @property
    def wire_bytes(self) -> int:
        return self.bytes_sent + self.bytes_received


@dataclass
class SyncResult:
    manifest: Manifest
    manifest_file: Path
    stats: TransferStats
    uploaded_keys: list[str] = field(default_factory=list)
    files_hashed: int = 0  # remote + local files read for the verify (the rest: cached)


def _last_line(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


class SshSession:
    """One ControlMaster connection that every later ssh/rsync call rides on."""

    def __init__(
        self, host: str, port: int | None, extra_opts: list[str], persist_s: int = 300
    ) -> None:
        self.host = host
        self.port = port
        self.persist_s = persist_s  # how long the master outlives a client that never closed
        self._resolved: tuple[str, str, int] | None = None
        self._control_dir = Path(tempfile.mkdtemp(prefix="sync-ssh-", dir="/tmp"))
        control = ["-o", f"ControlPath={self._control_dir}/cm"]
        # User options first: for ssh the first value given wins.
        self.base_args = [
            *extra_opts,
            *(["-p", str(port)] if port else []),
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={CONNECT_TIMEOUT_S}",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "ServerAliveInterval=15",
            *control,
        ]
        self._started = False

    def resolve(self) -> tuple[str, str, int]:
        """(user, hostname, port) after ~/.ssh/config, as ``ssh -G`` sees them."""
        if self._resolved is not None:
            return self._resolved
        result = subprocess.run(
            ["ssh", "-G", *self.base_args, self.host], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SyncError(
                "connect", f"ssh cannot parse host {self.host}: {_last_line(result.stderr)}"
            )
        values: dict[str, str] = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition(" ")
            values.setdefault(key.lower(), value.strip())
        self._resolved = (
            values.get("user", "root"),
            values.get("hostname", self.host),
            int(values.get("port", 22)),
        )
        return self._resolved

    def start(self) -> None:
        # -f: background after authentication, so errors still come back here. stderr goes to
        # a file: a persisted master holding a pipe open would stall whoever reads it.
        with tempfile.TemporaryFile() as err:
            result = subprocess.run(
                [
                    "ssh",
                    "-f",
                    "-N",
                    "-o",
                    "ControlMaster=yes",
                    "-o",
                    f"ControlPersist={self.persist_s}",
                    *self.base_args,
                    self.host,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            err.seek(0)
            detail = err.read().decode(errors="replace")
        if result.returncode != 0:
            raise SyncError(
                "connect", f"cannot open SSH to {self.host}: {_last_line(detail)}", detail
            )
        self._started = True

    def ssh_command(self) -> list[str]:
        return ["ssh", "-o", "ControlMaster=no", *self.base_args]

    def run(
        self, command: str, timeout: float | None = None, input: bytes | None = None
    ) -> subprocess.CompletedProcess:
        """One remote shell command over the master; ``input`` is sent as its stdin."""
        return subprocess.run(
            [*self.ssh_command(), self.host, command],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            timeout=timeout,
        )

    def popen(self, command: str, **kwargs: object) -> subprocess.Popen:
        """A remote command whose output the caller streams (logs, installer output)."""
        return subprocess.Popen([*self.ssh_command(), self.host, command], **kwargs)

    def close(self) -> None:
        if self._started:
            subprocess.run(
                ["ssh", *self.base_args, "-O", "exit", self.host],
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
        shutil.rmtree(self._control_dir, ignore_errors=True)

    def __enter__(self) -> SshSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_rsync_stats(output: str) -> TransferStats:
    """Numbers from ``rsync --stats`` (digits may be grouped with , or .)."""

    def number(label: str) -> int:
        match = re.search(rf"^{label}:\s*([\d,.]+)", output, re.MULTILINE)
        return int(re.sub(r"[^\d]", "", match.group(1))) if match else 0

    return TransferStats(
        bytes_sent=number("Total bytes sent"),
        bytes_received=number("Total bytes received"),
        total_file_size=number("Total file size"),
        transferred_file_size=number("Total transferred file size"),
        files_transferred=number("Number of regular files transferred"),
    )


def run_rsync(
    session: SshSession,
    remote_dir: str,
    local_dir: Path,
    show_progress: bool,
    *,
    push: bool = False,
    options: list[str] | None = None,
    rsync_path: str | None = None,
    copy_links: bool = True,
    stage: str = "transfer",
) -> TransferStats:
    """Pull ``remote_dir/`` into ``local_dir/`` (``push``: the other way) over the session's
    master connection; rsync's progress goes straight to stdout. ``options``: extra rsync
    options (excludes...); ``rsync_path``: the remote rsync command (default SYNC_RSYNC_PATH);
    ``copy_links``: send what symlinks point to (outputs) rather than the links (code).
    """
    remote_shell = shlex.join(session.ssh_command())
    # --copy-links: follow symlinks like the verify listing (find -L); links themselves would
    # leave the linked files on the instance while the manifest said "all home".
    command = ["rsync", "-a", *(["--copy-links"] if copy_links else [])]
    command += ["--partial", "--stats", "-e", remote_shell]
    if show_progress:
        command.append("--info=progress2")
    rsync_path = rsync_path or os.environ.get(RSYNC_PATH_ENV)
    if rsync_path:
        command.append(f"--rsync-path={rsync_path}")
    command += options or []
    remote, local = f"{session.host}:{remote_dir.rstrip('/')}/", f"{local_dir}/"
    command += [local, remote] if push else [remote, local]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    captured = bytearray()
    assert process.stdout is not None
    while chunk := process.stdout.read1(65536):
        captured += chunk
        if show_progress:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    stderr = process.stderr.read() if process.stderr else b""
    if process.wait() != 0:
        raise SyncError(stage, f"rsync exited with code {process.returncode}: {_last_line(stderr)}")
    return parse_rsync_stats(captured.decode(errors="replace"))


def check_remote_links(session: SshSession, host: str, remote_dir: str) -> None:
    """The directory exists and holds no dangling symlink or symlink loop (rsync -L needs it)."""
    check = session.run(remote_link_check_command(remote_dir))
    if check.returncode == 3:
        raise SyncError(
            "connect", f"remote directory {remote_dir} does not exist on {host}: check REMOTE_DIR"
        )
    if check.returncode == 255:
        raise SyncError("connect", f"SSH dropped: {_last_line(check.stderr)}")
    if check.returncode != 0:
        message = _last_line(check.stderr)
        hint = "remove the link that loops" if "loop" in message else "check permissions"
        raise SyncError("transfer", f"cannot walk {remote_dir} on {host}: {message}: {hint}")
    dangling = [p for p in check.stdout.decode(errors="replace").split("\0") if p]
    if dangling:
        more = f" (and {len(dangling) - 1} more)" if len(dangling) > 1 else ""
        raise SyncError(
            "transfer",
            f"remote symlink {remote_dir.rstrip('/')}/{dangling[0]} points to nothing{more}: "
            "remove it or fix its target (the sync follows symlinks)",
        )


def verify(
    session: SshSession, remote_dir: str, local_dir: Path, cache: HashCache
) -> tuple[list[FileEntry], list[str], int]:
    """(remote entries, problems, files hashed) after hashing both sides. Hashes whose stat
    key is unchanged in ``cache`` are reused (an empty cache hashes everything), and
    ``cache`` is refreshed in place."""
    try:
        remote_entries, remote_fresh, remote_hashed = list_remote_entries(
            lambda command, stdin: session.run(command, input=stdin), remote_dir, cache.remote
        )
    except RemoteListingError as error:
        raise SyncError("verify", str(error)) from None
    local_entries, local_fresh, local_hashed = hash_local_files(
        local_dir, [e.path for e in remote_entries], cache.local
    )
    cache.remote, cache.local = remote_fresh, local_fresh
    problems = compare_entries(remote_entries, local_entries)
    return remote_entries, problems, remote_hashed + local_hashed


def transfer(
    session: SshSession, remote_dir: str, local_dir: Path, show_progress: bool = True
) -> TransferStats:
    """The transfer stage: the remote dir exists and has no broken links, then rsync pulls."""
    check_remote_links(session, session.host, remote_dir)
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SyncError("transfer", f"cannot create {local_dir}: {error.strerror}") from None
    return run_rsync(session, remote_dir, local_dir, show_progress)


def verify_and_record(
    session: SshSession,
    remote_dir: str,
    local_dir: Path,
    environ: Mapping[str, str],
    verify_all: bool = False,
) -> tuple[Manifest, Path, int]:
    """The verify stage: compare both sides, write the manifest (and the hash cache beside it)
    either way; (manifest, its path, files hashed). SyncError("verify") when anything differs.
    ``verify_all``: ignore the hash cache, read every byte on both sides."""
    user, hostname, resolved_port = session.resolve()
    path = manifest_path(manifest_dir(environ), user, hostname, resolved_port, remote_dir)
    cache = read_hash_cache(path, str(local_dir), remote_dir)
    if verify_all:
        cache.local, cache.remote = {}, {}
    remote_entries, problems, hashed = verify(session, remote_dir, local_dir, cache)
    manifest = Manifest(
        host=session.host,
        ssh_hostname=hostname,
        ssh_port=resolved_port,
        ssh_user=user,
        remote_dir=remote_dir,
        local_dir=str(local_dir),
        files=remote_entries,
        verified=not problems,
        mismatches=problems,
    )
    write_manifest(manifest, path)
    write_hash_cache(path, cache)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SyncError("verify", f"{problems[0]}{more}; run the sync again (manifest: {path})")
    return manifest, path, hashed


def sync_outputs(
    host: str,
    local_dir: Path,
    remote_dir: str,
    port: int | None = None,
    environ: Mapping[str, str] | None = None,
    show_progress: bool = True,
    verify_all: bool = False,
) -> SyncResult:
    """All four stages; raises SyncError naming the stage that failed."""
    environ = os.environ if environ is None else environ
    extra_opts = shlex.split(environ.get(SSH_OPTS_ENV, ""))
    local_dir = Path(local_dir).expanduser().resolve()
    with SshSession(host, port, extra_opts) as session:
        session.resolve()
        session.start()
        stats = transfer(session, remote_dir, local_dir, show_progress)
        manifest, path, hashed = verify_and_record(
            session, remote_dir, local_dir, environ, verify_all
        )
    result = SyncResult(manifest, path, stats, files_hashed=hashed)
    bucket = environ.get("S3_BUCKET", "").strip()
    if bucket:
        result.uploaded_keys = upload_to_s3(manifest, bucket, environ)
    return result


def upload_to_s3(manifest: Manifest, bucket: str, environ: Mapping[str, str]) -> list[str]:
    """Upload the verified files; each object is checked in the bucket (size and sha256) by
    ``upload_directory``, so a file that did not land fails here, named."""
    prefix = environ.get("S3_PREFIX", "").strip()
    try:
        upload_directory(
            Path(manifest.local_dir),
            bucket,
            prefix,
            [entry.path for entry in manifest.files],
            client=make_client(environ.get("S3_ENDPOINT_URL") or None),
            known_sha256={entry.path: entry.sha256 for entry in manifest.files},
        )
    except S3SyncError as error:
        raise SyncError("upload", str(error)) from None
    except Exception as error:  # noqa: BLE001 - botocore config errors, endpoint unreachable
        raise SyncError("upload", error_line(error)) from None
    return [object_key(prefix, entry.path) for entry in manifest.files]


def load_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """SYNC_* from the environment, falling back to the repo's .env (the environment wins).

    ``launch_vast.py destroy`` reads the same settings, so both agree on SYNC_REMOTE_DIR and
    SYNC_SSH_OPTS. ``SYNC_DOTENV`` names another file (tests never read the developer's .env).
    """
    from dotenv import dotenv_values

    environ = os.environ if environ is None else environ
    dotenv_file = tools_dotenv_path(environ)
    from_file = (
        {k: v or "" for k, v in dotenv_values(dotenv_file).items()} if dotenv_file.is_file() else {}
    )
    return {**from_file, **environ}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sync_outputs.sh",
        description="Download REMOTE_DIR from HOST into LOCAL_DIR over SSH, verify it, "
        "and upload it to S3 when S3_BUCKET is set.",
    )
    parser.add_argument(
        "host", nargs="?", help="~/.ssh/config alias or user@host (default: SYNC_HOST)"
    )
    parser.add_argument("local_dir", nargs="?", help="default: SYNC_LOCAL_DIR")
    parser.add_argument("remote_dir", nargs="?", help="default: SYNC_REMOTE_DIR")
    parser.add_argument("-p", "--port", type=int, help="SSH port (default: from ~/.ssh/config)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no rsync progress")
    parser.add_argument(
        "--verify-all",
        action="store_true",
        help="hash every file on both sides again (default: reuse hashes of unchanged files)",
    )
    args = parser.parse_args(argv)
    settings = load_settings(os.environ)
    # Boto3 reads AWS_* from os.environ: let .env supply them without overriding the shell.
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_SESSION_TOKEN",
    ):
        if settings.get(name) and not os.environ.get(name):
            os.environ[name] = settings[name]
    host = args.host or settings.get("SYNC_HOST", "")
    local_dir = args.local_dir or settings.get("SYNC_LOCAL_DIR", "")
    remote_dir = args.remote_dir or settings.get("SYNC_REMOTE_DIR", "")
    missing = [
        name
        for name, value in (("HOST", host), ("LOCAL_DIR", local_dir), ("REMOTE_DIR", remote_dir))
        if not value
    ]
    if missing:
        print(
            f"sync_outputs: missing {', '.join(missing)}: pass HOST LOCAL_DIR REMOTE_DIR or set "
            "SYNC_HOST, SYNC_LOCAL_DIR, SYNC_REMOTE_DIR in .env",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        result = sync_outputs(
            host, Path(local_dir), remote_dir, args.port, settings, not args.quiet, args.verify_all
        )
    except SyncError as error:
        print(f"sync_outputs: {error}", file=sys.stderr)
        return STAGE_EXIT[error.stage]
    stats, manifest = result.stats, result.manifest
    print(
        f"sync_outputs: transferred bytes received={stats.bytes_received} sent={stats.bytes_sent} "
        f"tree={manifest.total_bytes}"
    )
    print(
        f"sync_outputs: verified {len(manifest.files)} files ({manifest.total_bytes} bytes) "
        f"from {host}:{remote_dir}, {result.files_hashed} hashed; manifest {result.manifest_file}"
    )
    if result.uploaded_keys:
        print(
            f"sync_outputs: uploaded {len(result.uploaded_keys)} files to s3://{settings['S3_BUCKET']}/"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
