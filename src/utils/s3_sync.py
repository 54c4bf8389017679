"""Mirror a local directory to S3 (or any S3-compatible store) and read it back.

Small on purpose: the output sync uses it after a verified download, and the S3 checkpoint
mirror reuses it. boto3's transfer manager (``upload_file``) does multipart uploads and
retries; each object carries its sha256 in metadata so an unchanged file is not uploaded
again. Credentials come from boto3's usual chain (AWS_* env, ~/.aws); they are never
printed, and error text is scrubbed of them in case a library ever echoes one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.utils.atomic_io import sha256_file

SECRET_ENVS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
SHA_METADATA = "sha256"


class S3SyncError(RuntimeError):
    """One line, credentials scrubbed."""


def scrub(text: str, environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    for name in SECRET_ENVS:
        value = environ.get(name) or ""
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def make_client(endpoint_url: str | None = None) -> Any:
    """An S3 client; ``S3_ENDPOINT_URL`` (or the argument) points it at a compatible store."""
    import boto3

    endpoint = endpoint_url or os.environ.get("S3_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint)


def object_key(prefix: str, relative_path: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{relative_path}" if prefix else relative_path


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
    Raises S3SyncError naming the file that failed.
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
            if existing.get(key) == path.stat().st_size:
                head = client.head_object(Bucket=bucket, Key=key)
                if head.get("Metadata", {}).get(SHA_METADATA) == digest:
                    result.skipped.append(key)
                    continue
            client.upload_file(
                str(path), bucket, key, ExtraArgs={"Metadata": {SHA_METADATA: digest}}
            )
            result.uploaded.append(key)
    except (BotoCoreError, ClientError, OSError) as error:
        where = f" at {current}" if current else ""
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise S3SyncError(
            scrub(f"s3://{bucket}/{prefix.strip('/')}{where}: {first_line}")
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
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
        written.append(target)
    return written
