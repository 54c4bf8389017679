"""src/storage/s3.py against moto's real S3 server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.storage.s3 import S3SyncError, download_directory, list_objects, upload_directory
from tests.support.moto_server import running_moto_s3
from tests.support.sync_helpers import make_tree


def test_upload_skip_unchanged_download_roundtrip(tmp_path: Path) -> None:
    make_tree(tmp_path / "up", {"a/b.bin": 6_000_000, "c.txt": 10})  # > 5 MB: multipart path
    with running_moto_s3() as s3:
        client = s3.client()
        client.create_bucket(Bucket="ckpt-bucket")
        first = upload_directory(tmp_path / "up", "ckpt-bucket", "/mirror/", client=client)
        assert sorted(first.uploaded) == ["mirror/a/b.bin", "mirror/c.txt"]
        (tmp_path / "up" / "c.txt").write_text("changed!!!")  # same size, new content
        second = upload_directory(tmp_path / "up", "ckpt-bucket", "mirror", client=client)
        assert second.uploaded == ["mirror/c.txt"] and second.skipped == ["mirror/a/b.bin"]
        assert list_objects(client, "ckpt-bucket", "mirror") == {
            "mirror/a/b.bin": 6_000_000,
            "mirror/c.txt": 10,
        }
        written = download_directory("ckpt-bucket", "mirror", tmp_path / "down", client=client)
        assert len(written) == 2
        for relative in ("a/b.bin", "c.txt"):
            assert (tmp_path / "down" / relative).read_bytes() == (
                tmp_path / "up" / relative
            ).read_bytes()


def test_missing_bucket_is_one_line_naming_it(tmp_path: Path) -> None:
    make_tree(tmp_path, {"x": 1})
    with running_moto_s3() as s3, pytest.raises(S3SyncError) as raised:
        upload_directory(tmp_path, "absent-bucket", "p", client=s3.client())
    assert "s3://absent-bucket/p" in str(raised.value) and "\n" not in str(raised.value)
