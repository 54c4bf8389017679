"""Mirror a run's checkpoints (and its other files) to S3 in the background.

Why: an instance's disk dies with it. Every checkpoint that lands on local disk is queued
here as its record (:class:`~src.checkpoints.record.CheckpointRecord`, which lists its files:
the mirror never needs to know the format); one background thread uploads each file (boto3
transfer manager), checks it in the bucket (size and the sha256 the record holds), and only
then rewrites the small
``manifest.json`` that lists the complete checkpoints. The manifest is written last, so a
reader never takes a half-uploaded checkpoint for a complete one, and a SIGKILL at any moment
leaves the previous manifest valid.

Layout under ``prefix`` (the trainer uses ``<s3_prefix>/<run_name>/checkpoints``)::

    step_000000120.pt       each file of a checkpoint (x-amz-meta-sha256 = recorded sha256)
    manifest.json           {"checkpoints": [<sidecar records>, newest first], ...}
    .mirror-lease.json      which machine mirrors this prefix now (heartbeat)

and, when ``files_dir`` is given, the run's other files (config.json, training_log.json,
best_model.pt, TensorBoard events, the W&B offline run) under ``files_prefix``.

Outages (endpoint down, 5xx, 503 SlowDown, expired credentials): the upload is retried with
backoff, one warning line when the outage starts and one when it ends; training never waits.
Retention: the newest ``keep_last_n`` checkpoints plus the best stay in the bucket. A local
checkpoint may be pruned only once :meth:`safe_to_delete` says so: it is verified in S3. After
an outage the backlog goes up newest first, so the checkpoint a resume needs is safe soonest.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from src.checkpoints.record import CheckpointRecord, retained_steps
from src.common.atomic_io import sha256_file
from src.common.console import print_note, print_warning
from src.runs.layout import CHECKPOINTS, LOCK, RunLayout
from src.storage.s3 import (
    S3SettingError,
    S3SyncError,
    download_verified,
    error_code,
    error_line,
    get_bytes,
    list_objects,
    make_client,
    make_transfer,
    object_key,
    probe_writable,
    put_bytes,
    upload_verified,
)

MANIFEST_NAME = "manifest.json"
LEASE_NAME = ".mirror-lease.json"
MANIFEST_VERSION = 1
LEASE_TTL_S = 90.0  # a lease whose heartbeat is older than this belongs to a dead machine
MAX_BACKOFF_S = 30.0
# The run's other files go up after a checkpoint, at most this often (and always on flush):
# event files and logs change every few steps, and re-sending them costs the loop CPU time.
FILES_INTERVAL_S = 30.0
AUTH_CODES = {"ExpiredToken", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}


class MirrorInUseError(S3SettingError):
    """Another machine mirrors the same prefix right now (one line, exit 2)."""

    label = "error"


@dataclass
class FlushReport:
    """What a bounded flush managed: steps verified in S3 and steps still waiting."""

    uploaded: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    files_pending: bool = False

    @property
    def complete(self) -> bool:
        return not self.waiting and not self.files_pending


class CheckpointMirror:
    """Background S3 mirror of one checkpoint directory (and optionally its run directory).

    Thread-safety: ``enqueue`` / ``mark_files_dirty`` / ``safe_to_delete`` may be called from
    any thread (the checkpoint writer calls them); one worker thread does all S3 writes.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        local_dir: Path,
        keep_last_n: int = 3,
        endpoint_url: str | None = None,
        files_dir: Path | None = None,
        files_prefix: str | None = None,
        client: Any = None,
    ) -> None:
        if keep_last_n < 1:
            raise ValueError("remote keep_last_n must be >= 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.local_dir = Path(local_dir)
        self.keep_last_n = keep_last_n
        self.endpoint_url = endpoint_url
        self.files_dir = Path(files_dir) if files_dir is not None else None
        self.files_prefix = (files_prefix or "").strip("/")
        # No botocore retries: the worker's own backoff retries whole uploads, and a failure
        # shows at once (one warning) instead of after botocore's own backoff.
        self.client = client or make_client(endpoint_url, max_attempts=1)
        self._transfer = make_transfer(self.client)
        self._cond = threading.Condition()
        self._remote: dict[int, CheckpointRecord] = {}  # verified in S3, in the manifest
        # The manifest as read before start(): the opening, the download and start() share
        # one read; from start() on the worker owns the manifest and this is dropped.
        self._manifest_before_start: list[CheckpointRecord] | None = None
        self._uploaded: dict[int, str] = {}  # step -> sha256 verified in S3 by this process
        self._pending: dict[int, CheckpointRecord] = {}  # committed locally, not yet in S3
        self._files_dirty = False
        self._files_due = 0.0  # monotonic time the run files may go up again
        self._flushing = False
        self._file_marks: dict[str, tuple[int, int]] = {}  # relpath -> (size, mtime_ns) sent
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False
        self._outage_since: float | None = None
        self._failures = 0
        self._lease_id = uuid.uuid4().hex
        self._lease_sent_at = 0.0
        self.last_error: str | None = None

    # ----- locations -----------------------------------------------------------------------

    def url(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{object_key(self.prefix, name)}"

    def _key(self, name: str) -> str:
        return object_key(self.prefix, name)

    # ----- start-up ------------------------------------------------------------------------

    def probe(self, setting: str = "remote_bucket") -> None:
        """One-line S3SettingError now if the prefix cannot be written (no credentials, no
        bucket, bad endpoint): before training, not 40 minutes into it. ``setting`` is the
        key the message tells the user to fix."""
        probe_writable(self.client, self.bucket, self.prefix, setting)

    def remote_checkpoints(self) -> list[CheckpointRecord]:
        """The manifest's complete checkpoints, newest first, located as they would be once
        downloaded into ``local_dir``. Read from S3 once before :meth:`start` (start-up asks
        several times: the opening, the download, the start), every time after it."""
        if self._thread is None and self._manifest_before_start is not None:
            return list(self._manifest_before_start)
        records = self._read_manifest()
        if self._thread is None:
            self._manifest_before_start = records
        return list(records)

    def _read_manifest(self) -> list[CheckpointRecord]:
        body = get_bytes(self.client, self.bucket, self._key(MANIFEST_NAME))
        if body is None:
            return []
        try:
            entries = json.loads(body)["checkpoints"]
            records = [CheckpointRecord.from_json(entry, self.local_dir) for entry in entries]
        except (ValueError, KeyError, TypeError) as error:
            raise S3SyncError(f"{self.url(MANIFEST_NAME)} is unreadable: {error}") from None
        return sorted(records, key=lambda record: record.step, reverse=True)

    def remote_records(self) -> list[dict[str, Any]]:
        """:meth:`remote_checkpoints` as the manifest's JSON entries (``record["step"]``)."""
        return [record.to_json() for record in self.remote_checkpoints()]

    def start(self, local_records: list[CheckpointRecord]) -> None:
        """Take the lease, learn what S3 holds, queue local checkpoints it lacks, start the
        worker. ``local_records``: the local sidecars (a previous run's unfinished uploads)."""
        if self._thread is not None:
            return
        try:
            self._acquire_lease()
            remote = {record.step: record for record in self.remote_checkpoints()}
        except S3SettingError:
            raise
        except Exception as error:  # noqa: BLE001 - S3 went away since the probe
            raise S3SettingError(
                f"cannot start the S3 mirror at {self.url()}: {error_line(error)}"
            ) from None
        self._manifest_before_start = None
        with self._cond:
            self._remote = remote
            for record in local_records:
                known = remote.get(record.step)
                if known is None or known.sha256 != record.sha256:
                    self._pending[record.step] = record
            self._files_dirty = self.files_dir is not None
            self._stopping = False
        if self._pending:
            steps = ", ".join(str(step) for step in sorted(self._pending))
            print_note(f"uploading checkpoint(s) a previous run left on this disk: step {steps}")
        self._thread = threading.Thread(target=self._work, name="s3-mirror", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Started (lease taken, worker alive) and not yet stopped."""
        return self._thread is not None

    # ----- called by the checkpoint writer ---------------------------------------------------

    def enqueue(self, record: CheckpointRecord) -> None:
        """A checkpoint is durable locally (its sidecar committed): upload it."""
        with self._cond:
            self._pending[record.step] = record
            if self.files_dir is not None:
                self._files_dirty = True
            self._failures = 0  # something new to send: try now, not after the backoff
            self._cond.notify_all()

    def mark_files_dirty(self) -> None:
        with self._cond:
            if self.files_dir is not None:
                self._files_dirty = True
                self._cond.notify_all()

    def safe_to_delete(self, step: int, sha256: str) -> bool:
        """May the local copy of ``step`` go? Only once S3 has it, verified (or had it:
        remote retention may already have replaced it there)."""
        with self._cond:
            if step in self._uploaded:
                return self._uploaded[step] == sha256
            remote = self._remote.get(step)
            return remote is not None and remote.sha256 == sha256

    # ----- stopping ------------------------------------------------------------------------

    def flush(self, timeout: float | None) -> FlushReport:
        """Wait until everything queued is in S3, or ``timeout`` seconds; never raises."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._failures = 0  # retry now rather than after the current backoff
            self._flushing = True  # the run files go now, not after FILES_INTERVAL_S
            self._cond.notify_all()
            while self._thread is not None and self._has_work():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(timeout=remaining if remaining is not None else 1.0)
            self._flushing = False
            return FlushReport(
                uploaded=sorted(self._remote),
                waiting=sorted(self._pending),
                files_pending=self._files_dirty or self._busy,
            )

    def stop(self, timeout: float | None) -> FlushReport:
        """Flush (bounded), stop the worker, release the lease."""
        report = self.flush(timeout)
        thread = self._thread
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=5)
            self._thread = None
        self._release_lease()
        return report

    def push_files(self) -> None:
        """Upload the run's changed files now, in this thread (after the worker stopped: the
        test results a script writes after fit). Failures are one warning line."""
        if self.files_dir is None:
            return
        try:
            self._upload_files()
        except Exception as error:  # noqa: BLE001 - the files stay local; say so once
            print_warning(f"could not upload run files to {self.url()}: {error_line(error)}")

    # ----- downloading ---------------------------------------------------------------------

    def download(
        self, record: CheckpointRecord, directory: Path | None = None, progress: bool = True
    ) -> None:
        """Download every file of one manifest checkpoint into ``directory`` (default
        ``local_dir``), each verified and renamed into place, with one progress bar. The
        caller commits it (the format's sidecar) once this returns."""
        from tqdm import tqdm

        directory = Path(directory) if directory is not None else self.local_dir
        with tqdm(
            total=record.size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"download step {record.step}",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        ) as bar:
            for part in record.files:
                target = directory / part.name
                target.parent.mkdir(parents=True, exist_ok=True)  # a multi-file folder
                download_verified(
                    self.client,
                    self.bucket,
                    self._key(part.name),
                    target,
                    sha256=part.sha256,
                    size=part.size,
                    callback=bar.update,
                )

    def restore_files(self) -> list[str]:
        """Download the run's other files that are missing locally (a fresh machine)."""
        if self.files_dir is None:
            return []
        base = self.files_prefix
        skip = f"{self.prefix}/"
        restored = []
        for key in sorted(list_objects(self.client, self.bucket, base)):
            if key.startswith(skip) or key == self.prefix:
                continue  # the checkpoints are the manager's business
            relative = key[len(base) :].lstrip("/") if base else key
            target = self.files_dir / relative
            if not relative or target.exists():
                continue
            if self.files_dir.resolve() not in target.resolve().parents:
                continue  # a key with ../ never writes outside the run directory
            download_verified(self.client, self.bucket, key, target)
            restored.append(relative)
        return restored

    # ----- the worker ------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._pending) or self._files_dirty or self._busy

    def _next_job(self) -> tuple[int | None, bool]:
        """(newest pending step, or None; whether the run files are due). Lock held."""
        if self._pending:
            return max(self._pending), False
        due = self._flushing or time.monotonic() >= self._files_due
        return None, self._files_dirty and due

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    step, do_files = self._next_job()
                    if step is not None or do_files:
                        break
                    timeout = LEASE_TTL_S / 3
                    if self._files_dirty:
                        timeout = min(timeout, max(0.05, self._files_due - time.monotonic()))
                    if not self._cond.wait(timeout=timeout) and not self._files_dirty:
                        break  # idle for a while: just the lease heartbeat
                record = self._pending[step] if step is not None else None
                if do_files:
                    self._files_dirty = False
                    self._files_due = time.monotonic() + FILES_INTERVAL_S
                self._busy = True
            try:
                self._heartbeat()
                if record is not None:
                    self._upload_checkpoint(record)
                elif do_files:
                    self._upload_files()
                self._recovered()
            except Exception as error:  # noqa: BLE001 - an outage: back off, never crash
                if do_files:
                    self.mark_files_dirty()
                self._outage(error)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload_checkpoint(self, record: CheckpointRecord) -> None:
        step = record.step
        if not all((self.local_dir / part.name).is_file() for part in record.files):
            # Pruned locally without reaching S3 cannot happen (safe_to_delete); a user
            # deleting files by hand can. Drop it: nothing complete left to upload.
            with self._cond:
                self._pending.pop(step, None)
            print_warning(f"checkpoint {record.path.name} vanished before its upload; skipped")
            return
        for part in record.files:
            upload_verified(
                self.client,
                self.local_dir / part.name,
                self.bucket,
                self._key(part.name),
                sha256=part.sha256,
                size=part.size,
                transfer=self._transfer,
            )
        with self._cond:
            self._remote[step] = record
            self._pending.pop(step, None)
            keep = retained_steps(self._remote, self.keep_last_n)
            dropped = [self._remote.pop(s) for s in list(self._remote) if s not in keep]
            self._uploaded[step] = record.sha256
            manifest = self._manifest_bytes()
        put_bytes(self.client, self.bucket, self._key(MANIFEST_NAME), manifest)  # last
        for old in dropped:  # unlisted first, then deleted: a reader never misses a file
            for part in old.files:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(part.name))

    def _manifest_bytes(self) -> bytes:
        records = [self._remote[step].to_json() for step in sorted(self._remote, reverse=True)]
        body = {"version": MANIFEST_VERSION, "updated_at": time.time(), "checkpoints": records}
        return (json.dumps(body, indent=2) + "\n").encode()

    def _upload_files(self) -> None:
        assert self.files_dir is not None
        for path in sorted(self.files_dir.rglob("*")):
            relative = path.relative_to(self.files_dir).as_posix()
            if not path.is_file() or path.is_symlink() or _not_mirrored(relative):
                continue
            stat = path.stat()
            mark = (stat.st_size, stat.st_mtime_ns)
            if self._file_marks.get(relative) == mark:
                continue
            digest = sha256_file(path)
            key = object_key(self.files_prefix, relative)
            try:
                upload_verified(
                    self.client,
                    path,
                    self.bucket,
                    key,
                    sha256=digest,
                    size=stat.st_size,
                    transfer=self._transfer,
                )
            except S3SyncError:
                # The file changed while it was read (an event file being appended): the
                # next pass sends the newer bytes.
                self.mark_files_dirty()
                continue
            self._file_marks[relative] = mark

    # ----- outages -------------------------------------------------------------------------

    def _outage(self, error: BaseException) -> None:
        self.last_error = error_line(error)
        with self._cond:
            self._failures += 1
            failures = self._failures
            first = self._outage_since is None
            if first:
                self._outage_since = time.monotonic()
            waiting = len(self._pending)
        if error_code(error) in AUTH_CODES:
            self.client = make_client(self.endpoint_url, max_attempts=1)  # refreshed keys
            self._transfer = make_transfer(self.client)
        if first:
            print_warning(
                f"S3 upload to {self.url()} failed ({self.last_error}); training goes on, "
                f"{waiting} checkpoint(s) waiting, retrying with backoff"
            )
        delay = min(MAX_BACKOFF_S, 0.5 * 2 ** min(failures, 10))
        with self._cond:
            deadline = time.monotonic() + delay
            while not self._stopping and self._failures and time.monotonic() < deadline:
                self._cond.wait(timeout=deadline - time.monotonic())

    def _recovered(self) -> None:
        with self._cond:
            since, self._outage_since = self._outage_since, None
            self._failures = 0
            waiting = len(self._pending)
        if since is not None:
            print_note(
                f"S3 answers again after {time.monotonic() - since:.0f} s; "
                f"{waiting} checkpoint(s) still to upload"
            )

    # ----- the lease: one machine mirrors a prefix at a time ---------------------------------

    def check_lease(self) -> None:
        """Raise MirrorInUseError if another live machine holds this prefix (reads only)."""
        key = self._key(LEASE_NAME)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as error:
            if error_code(error) not in {"NoSuchKey", "404"}:
                raise
        else:
            holder = json.loads(response["Body"].read() or b"{}")
            age = _age_seconds(response)
            if holder.get("host") != socket.gethostname() and age < LEASE_TTL_S:
                raise MirrorInUseError(
                    f"{self.url()} is being mirrored by pid {holder.get('pid')} on "
                    f"{holder.get('host')} (heartbeat {age:.0f} s ago): stop that run, use "
                    f"another run_name or s3_prefix, or if that machine is gone wait "
                    f"{LEASE_TTL_S - age:.0f} s"
                )
            # The same host: the run lock (flock) already proved the old process is gone.

    def _acquire_lease(self) -> None:
        self.check_lease()
        self._heartbeat(force=True)

    def _heartbeat(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._lease_sent_at < LEASE_TTL_S / 3:
            return
        body = {"host": socket.gethostname(), "pid": os.getpid(), "lease_id": self._lease_id}
        put_bytes(self.client, self.bucket, self._key(LEASE_NAME), json.dumps(body).encode())
        self._lease_sent_at = time.monotonic()

    def _release_lease(self) -> None:
        try:
            body = get_bytes(self.client, self.bucket, self._key(LEASE_NAME))
            if body is not None and json.loads(body).get("lease_id") == self._lease_id:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(LEASE_NAME))
        except Exception:  # noqa: BLE001 - an unreachable S3 at exit: the lease just expires
            pass


def _not_mirrored(relative: str) -> bool:
    """The checkpoints (mirrored on their own), the run lock and temp files."""
    name = relative.rsplit("/", 1)[-1]
    return (
        relative.startswith(f"{CHECKPOINTS}/")
        or name == LOCK
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _age_seconds(response: Mapping[str, Any]) -> float:
    """Seconds since the object was written, by the server's own clock (no clock skew)."""
    try:
        server_now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        return max(0.0, (server_now - response["LastModified"]).total_seconds())
    except (KeyError, TypeError, ValueError):
        return 0.0


def mirror_for_run(settings: Any, run_name: str, run_dir: Path) -> CheckpointMirror:
    """The trainer's mirror: ``settings`` is the ``checkpoint:`` config section. Probed (a
    write to the prefix) and lease-checked, so bad settings fail before training."""
    run_prefix = object_key(settings.s3_prefix, run_name)
    mirror = CheckpointMirror(
        settings.s3_bucket,
        object_key(run_prefix, CHECKPOINTS),
        local_dir=RunLayout(Path(run_dir)).checkpoints,
        keep_last_n=settings.remote_keep_last_n or settings.keep_last_n,
        endpoint_url=settings.endpoint_url,
        files_dir=Path(run_dir),
        files_prefix=run_prefix,
    )
    mirror.probe("checkpoint.s3_bucket")
    mirror.check_lease()
    return mirror
