"""The download manifest: the remote listing commands, parsing, comparing, atomic write/read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from src.storage.manifest import (
    FileEntry,
    Manifest,
    RemoteListingError,
    build_local_entries,
    compare_entries,
    covers,
    find_manifests,
    list_remote_entries,
    manifest_path,
    parse_hash_listing,
    parse_stat_listing,
    read_manifest,
    remote_stat_command,
    verify_local,
    write_manifest,
)
from src.storage.output_sync import parse_rsync_stats
from tests.support.sync_helpers import make_tree

ODD_NAMES = {"a.txt": 10, "dir/with space.bin": 2000, "dir/new\nline": 5, "back\\slash": 7}


def local_shell(command: str, stdin: bytes | None) -> subprocess.CompletedProcess:
    """Run the exact command ssh would run, with a local shell."""
    return subprocess.run(["sh", "-c", command], input=stdin, capture_output=True)


def listing_of(directory: Path) -> list[FileEntry]:
    return list_remote_entries(local_shell, str(directory))[0]


def test_remote_listing_matches_local_hashes_even_for_odd_names(tmp_path: Path) -> None:
    make_tree(tmp_path, ODD_NAMES)
    remote = listing_of(tmp_path)
    assert sorted(e.path for e in remote) == sorted(ODD_NAMES)
    assert remote == build_local_entries(tmp_path, [e.path for e in remote])
    assert build_local_entries(tmp_path) == remote


def test_remote_listing_follows_symlinks(tmp_path: Path) -> None:
    make_tree(tmp_path / "elsewhere", {"ckpt.pt": 50})
    make_tree(tmp_path / "out", {"run2/x": 5})
    (tmp_path / "out" / "run1").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    entries = listing_of(tmp_path / "out")
    assert [(e.path, e.size) for e in entries] == [("run1/ckpt.pt", 50), ("run2/x", 5)]
    ckpt = build_local_entries(tmp_path / "elsewhere", ["ckpt.pt"])[0]
    assert entries[0].sha256 == ckpt.sha256


def test_covers_means_the_root_or_a_parent_of_it() -> None:
    assert covers("/workspace/persistent", "/workspace/persistent/")
    assert covers("/workspace/", "/workspace/persistent")
    assert covers("/", "/workspace/persistent")
    assert not covers("/workspace/persistent/run1", "/workspace/persistent")
    assert not covers("/workspace/pers", "/workspace/persistent")  # a prefix, not a parent
    assert not covers("/tmp/empty", "/workspace/persistent") and not covers("", "/x")


def test_remote_listing_of_missing_dir_exits_3(tmp_path: Path) -> None:
    result = subprocess.run(
        ["sh", "-c", remote_stat_command(str(tmp_path / "nope"))], capture_output=True
    )
    assert result.returncode == 3 and b"no such directory" in result.stderr
    with pytest.raises(RemoteListingError, match="does not exist"):
        listing_of(tmp_path / "nope")


def test_quoting_survives_hostile_dir_names(tmp_path: Path) -> None:
    hostile = tmp_path / "it's $(touch pwned); x"
    make_tree(hostile, {"f": 3})
    assert [e.path for e in listing_of(hostile)] == ["f"]
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_parse_rejects_inconsistent_listing() -> None:
    def vanished(command: str, stdin: bytes | None) -> subprocess.CompletedProcess:
        """a is listed, then gone before it is hashed: sha256sum has nothing for it."""
        out = b"S 3 1.0 1.0 7 8 a\0" if stdin is None else b""
        return subprocess.CompletedProcess(command, 0, out, b"")

    with pytest.raises(RemoteListingError, match="appeared or vanished"):
        list_remote_entries(vanished, "/r")
    with pytest.raises(ValueError, match="unexpected line"):
        parse_stat_listing(b"garbage\0")
    with pytest.raises(ValueError, match="unexpected line"):
        parse_hash_listing(b"garbage\0")


def test_compare_reports_missing_size_and_checksum() -> None:
    expected = [FileEntry("a", 1, "x"), FileEntry("b", 2, "y"), FileEntry("c", 3, "z")]
    actual = [FileEntry("a", 1, "x"), FileEntry("b", 5, "y"), FileEntry("c", 3, "q")]
    assert compare_entries(expected, actual) == ["b: size 5 != 2", "c: sha256 differs"]
    assert compare_entries(expected, actual[:1]) == ["b: missing", "c: missing"]
    assert compare_entries(expected, expected) == []


def test_write_read_roundtrip_and_find(tmp_path: Path) -> None:
    make_tree(tmp_path / "local", {"r/x": 100})
    entries = build_local_entries(tmp_path / "local")
    manifest = Manifest(
        "alias",
        "1.2.3.4",
        2222,
        "root",
        "/workspace/p",
        str(tmp_path / "local"),
        entries,
        verified=True,
    )
    path = manifest_path(tmp_path / "m", "root", "1.2.3.4", 2222, "/workspace/p")
    write_manifest(manifest, path)
    assert read_manifest(path) == manifest and read_manifest(path).total_bytes == 100
    assert [m for _, m in find_manifests(tmp_path / "m", "1.2.3.4", 2222)] == [manifest]
    assert find_manifests(tmp_path / "m", "1.2.3.4", 2223) == []
    assert list((tmp_path / "m").iterdir()) == [path]  # no temp files left behind
    assert verify_local(manifest) == []
    (tmp_path / "local" / "r" / "x").write_bytes(b"changed")
    assert verify_local(manifest) == ["r/x: size 7 != 100"]


def test_unreadable_manifest_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError) as raised:
        read_manifest(bad)
    assert "not a readable download manifest" in str(raised.value)
    assert find_manifests(tmp_path, "h", 1) == []  # skipped, not fatal


def test_parse_rsync_stats() -> None:
    stats = parse_rsync_stats(
        "Total file size: 1,073,741,824 bytes\nTotal transferred file size: 0 bytes\n"
        "Total bytes sent: 1,234\nTotal bytes received: 56\n"
    )
    assert (stats.bytes_sent, stats.bytes_received) == (1234, 56)
    assert stats.total_file_size == 1_073_741_824 and stats.wire_bytes == 1290
