"""The one S3 layer: the output sync's upload and the checkpoint mirror both go through it.

boto3's transfer manager (``upload_file`` / ``download_file`` with ``TRANSFER``) does the
multipart and concurrent parts; botocore adds a CRC32 to each request that S3 checks, and
every object carries the sha256 its writer recorded in its metadata (``x-amz-meta-sha256``),
which is what "verified" means here: the object's size and recorded sha256 match ours, and a
download is hashed again before it replaces anything.

Credentials come from boto3's usual chain (AWS_* env, ``.env`` loaded into it, ~/.aws, an
instance role); they are never printed, and error text is scrubbed of them in case a library
ever echoes one. Works with S3-compatible stores through ``endpoint_url`` (MinIO, R2, B2).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.common.atomic_io import fsync_dir, sha256_file, temp_path_for
from src.common.errors import DiskFullError, free_bytes, is_disk_full
from src.config import BUCKET_NAME, ConfigError

SECRET_ENVS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
SHA_METADATA = "sha256"
MiB = 1024 * 1024
SINGLE_PUT_BYTES = 8 * MiB  # below this, one PutObject beats the transfer manager's threads


class S3SyncError(RuntimeError):
    """One line, credentials scrubbed."""


class S3SettingError(ConfigError):
    """S3 settings that cannot work (no credentials, no bucket, bad endpoint): found at
    start-up by a write probe, printed as one line, exit 2."""

    label = "s3 error"


def scrub(text: str, environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    for name in SECRET_ENVS:
        value = environ.get(name) or ""
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def transfer_config() -> Any:
    """Multipart above 16 MiB in 16 MiB parts, 10 parts at a time (boto3's own pool size)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=10
    )


def make_transfer(client: Any) -> Any:
    """A reusable transfer manager for ``client`` (its threads are started once)."""
    from boto3.s3.transfer import S3Transfer

    return S3Transfer(client, transfer_config())


def make_client(endpoint_url: str | None = None, *, max_attempts: int = 3) -> Any:
    """An S3 client; ``S3_ENDPOINT_URL`` (or the argument) points it at a compatible store.

    Short connect timeout and few botocore retries: the mirror runs its own backoff around
    whole uploads, so one outage costs seconds per try, never minutes. A new session each
    time: boto3's default one caches credentials, and a refreshed key must be picked up.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("S3_ENDPOINT_URL") or None
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"mode": "standard", "max_attempts": max_attempts},
    )
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    if max_attempts == 1:
        # No botocore retry handler at all: its jitter draws from Python's global `random`,
        # whose state a resumable run saves and replays, so a failed upload in a background
        # thread would change the training run. The caller retries on its own.
        client.meta.events.unregister("needs-retry.s3", unique_id="retry-config-s3")
    return client


def object_key(prefix: str, relative_path: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{relative_path}" if prefix else relative_path


def error_line(error: BaseException) -> str:
    """``Type: first line`` of an exception, scrubbed of credentials."""
    text = str(error).splitlines()[0] if str(error) else ""
    return scrub(f"{type(error).__name__}: {text}" if text else type(error).__name__)


def error_code(error: BaseException) -> str:
    """The S3 error code of a ClientError (``NoSuchBucket``, ``SlowDown``, ``403``), else ''."""
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


# ----- single objects, verified ------------------------------------------------------------


def upload_verified(
    client: Any,
    path: Path,
    bucket: str,
    key: str,
    *,
    sha256: str,
    size: int,
    callback: Callable[[int], None] | None = None,
    transfer: Any = None,
) -> None:
    """Upload ``path`` with its recorded sha256, then check the object's size and sha256.

    Small files are one PutObject (no transfer threads to start); larger ones go through
    the transfer manager (``transfer``: a reused ``S3Transfer``, else a new one per call).
    Raises S3SyncError if the object in the bucket is not what was recorded.
    """
    metadata = {SHA_METADATA: sha256}
    if size < SINGLE_PUT_BYTES:
        with open(path, "rb") as body:
            client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata)
        if callback is not None:
            callback(size)
    elif transfer is not None:
        transfer.upload_file(
            str(path), bucket, key, callback=callback, extra_args={"Metadata": metadata}
        )
    else:
        client.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs={"Metadata": metadata},
            Config=transfer_config(),
            Callback=callback,
        )
    check_object(client, bucket, key, sha256=sha256, size=size)


def check_object(client: Any, bucket: str, key: str, *, sha256: str, size: int) -> None:
    head = client.head_object(Bucket=bucket, Key=key)
    if int(head["ContentLength"]) != size:
        raise S3SyncError(f"s3://{bucket}/{key} has {head['ContentLength']} bytes, not {size}")
    if head.get("Metadata", {}).get(SHA_METADATA) != sha256:
        raise S3SyncError(f"s3://{bucket}/{key}: sha256 in the bucket differs from the record")


def download_verified(
    client: Any,
    bucket: str,
    key: str,
    target: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    callback: Callable[[int], None] | None = None,
) -> None:
    """Download to a temp file, check size and sha256, then rename over ``target``.

    A failed or interrupted download never leaves a partial ``target``; one that cannot fit
    raises DiskFullError (before it starts, when ``size`` says so).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if size is not None and free_bytes(target.parent) < size:
        raise DiskFullError(target, size)
    tmp = temp_path_for(target)
    try:
        try:
            client.download_file(bucket, key, str(tmp), Config=transfer_config(), Callback=callback)
        except Exception as error:
            if is_disk_full(error):
                tmp.unlink(missing_ok=True)
                raise DiskFullError(target, size) from error
            raise
        if size is not None and tmp.stat().st_size != size:
            raise S3SyncError(
                f"s3://{bucket}/{key}: downloaded {tmp.stat().st_size} bytes, expected {size}"
            )
        if sha256 is not None and sha256_file(tmp) != sha256:
            raise S3SyncError(f"s3://{bucket}/{key}: sha256 of the download does not match")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def put_bytes(client: Any, bucket: str, key: str, body: bytes) -> None:
    digest = hashlib.sha256(body).hexdigest()
    client.put_object(Bucket=bucket, Key=key, Body=body, Metadata={SHA_METADATA: digest})


def get_bytes(client: Any, bucket: str, key: str) -> bytes | None:
    """The object's bytes, or None when there is no such key."""
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        if error_code(error) in {"NoSuchKey", "404"}:
            return None
        raise


# ----- start-up check ------------------------------------------------------------------------


def probe_writable(client: Any, bucket: str, prefix: str, setting: str = "bucket") -> None:
    """Fail now, in one line, if ``s3://bucket/prefix/`` cannot be written: a probe object is
    put and deleted. ``setting`` names the config key the message points at."""
    where = f"s3://{bucket}/{prefix.strip('/')}"
    if not BUCKET_NAME.fullmatch(bucket or ""):
        raise S3SettingError(
            f"{setting}={bucket!r} is not a valid bucket name: 3-63 lowercase letters, digits, "
            "dots or hyphens"
        )
    key = object_key(prefix, f".write-probe-{os.getpid()}-{time.time_ns()}")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"probe")
        client.delete_object(Bucket=bucket, Key=key)
    except Exception as error:  # noqa: BLE001 - every cause becomes one line below
        raise S3SettingError(_probe_problem(error, bucket, where, setting)) from None


def _probe_problem(error: BaseException, bucket: str, where: str, setting: str) -> str:
    from botocore.exceptions import (
        EndpointConnectionError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    code = error_code(error)
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return (
            f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(environment or .env), ~/.aws/credentials, or use an instance role"
        )
    if code == "NoSuchBucket":
        return f"bucket '{bucket}' does not exist: create it, or fix {setting}"
    if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}:
        return f"S3 rejected the credentials ({code}) for {where}: check the AWS_* keys"
    if code in {"AccessDenied", "403", "AllAccessDisabled"}:
        return f"access denied writing {where}: the credentials need s3:PutObject on it"
    if isinstance(error, EndpointConnectionError) or "Could not connect" in str(error):
        return f"cannot reach S3 ({error_line(error)}): fix endpoint_url or the network"
    if isinstance(error, (ValueError, ParamValidationError)):
        return f"bad S3 setting for {where}: {error_line(error)}"
    return f"cannot write {where}: {error_line(error)}"


# ----- directories (the output sync) --------------------------------------------------------


@dataclass
class UploadResult:
    uploaded: list[str]
    skipped: list[str]  # already in the bucket with the same size and sha256

    @property
    def keys(self) -> list[str]:
        return self.uploaded + self.skipped


def list_objects(client: Any, bucket: str, prefix: str = "") -> dict[str, int]:
    """``{key: size}`` of every object under ``prefix`` (follows pagination)."""
    paginator = client.get_paginator("list_objects_v2")
    sizes: dict[str, int] = {}
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix.strip("/")):
        for item in page.get("Contents", []):
            sizes[item["Key"]] = int(item["Size"])
    return sizes


def upload_directory(
    local_dir: Path,
    bucket: str,
    prefix: str = "",
    relative_paths: Iterable[str] | None = None,
    client: Any = None,
    known_sha256: Mapping[str, str] | None = None,
) -> UploadResult:
    """Upload ``relative_paths`` (default: every file) of ``local_dir`` to ``s3://bucket/prefix/``.

    ``known_sha256`` saves re-hashing files whose checksums a manifest already holds.
    Unchanged objects (same size and sha256) are skipped. Raises S3SyncError naming the file.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    local_dir = Path(local_dir)
    client = client or make_client()
    if relative_paths is None:
        relative_paths = sorted(
            p.relative_to(local_dir).as_posix()
            for p in local_dir.rglob("*")
            if p.is_file() and not p.is_symlink()
        )
    known_sha256 = known_sha256 or {}
    result = UploadResult([], [])
    current = ""
    try:
        existing = list_objects(client, bucket, prefix)
        for relative in relative_paths:
            current = relative
            path = local_dir / relative
            key = object_key(prefix, relative)
            digest = known_sha256.get(relative) or sha256_file(path)
            size = path.stat().st_size
            if existing.get(key) == size:
                head = client.head_object(Bucket=bucket, Key=key)
                if head.get("Metadata", {}).get(SHA_METADATA) == digest:
                    result.skipped.append(key)
                    continue
            upload_verified(client, path, bucket, key, sha256=digest, size=size)
            result.uploaded.append(key)
    except (BotoCoreError, ClientError, OSError, S3SyncError) as error:
        where = f" at {current}" if current else ""
        raise S3SyncError(
            scrub(f"s3://{bucket}/{prefix.strip('/')}{where}: {error_line(error)}")
        ) from None
    return result


def download_directory(bucket: str, prefix: str, local_dir: Path, client: Any = None) -> list[Path]:
    """Download every object under ``prefix`` into ``local_dir`` (keys relative to prefix)."""
    client = client or make_client()
    local_dir = Path(local_dir)
    written = []
    base = prefix.strip("/")
    for key in sorted(list_objects(client, bucket, base)):
        relative = key[len(base) :].lstrip("/") if base else key
        if not relative or relative.endswith("/"):
            continue
        target = local_dir / relative
        if local_dir.resolve() not in target.resolve().parents:
            raise S3SyncError(f"s3://{bucket}/{key}: key escapes {local_dir}, not downloaded")
        download_verified(client, bucket, key, target)
        written.append(target)
    return written
