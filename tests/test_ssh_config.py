"""ssh-config edits ~/.ssh/config as text: our block changes, every other byte stays."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from src.cloud.ssh_config import render_host_block, upsert_host_block, write_host_block

REPO_ROOT = Path(__file__).resolve().parents[1]

EXISTING = """\
# my hosts
Include ~/.ssh/config.d/*

Host github.com
\tUser git
\tIdentityFile ~/.ssh/github   # trailing comment

Host  work-box  work
    HostName 10.0.0.5
    Port 2222

# comment that introduces the catch-all
Host *
    AddKeysToAgent yes
"""


def test_new_block_goes_before_catch_all_and_keeps_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(EXISTING)
    config.chmod(0o640)
    block = render_host_block("vastai-101", "203.0.113.7", 20022)
    assert write_host_block(config, "vastai-101", block) == "added"
    text = config.read_text()
    head, _, tail = text.partition(block)
    assert head + tail.removeprefix("\n") == EXISTING  # others byte-identical
    assert text.index("Host vastai-101") < text.index("# comment that introduces")
    assert config.stat().st_mode & 0o777 == 0o640  # the user's mode is kept


def test_update_replaces_only_our_block(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(EXISTING)
    write_host_block(config, "vastai-101", render_host_block("vastai-101", "203.0.113.7", 20022))
    first = config.read_text()
    new_block = render_host_block("vastai-101", "198.51.100.9", 41000)
    assert write_host_block(config, "vastai-101", new_block) == "updated"
    second = config.read_text()
    assert "198.51.100.9" in second and "203.0.113.7" not in second
    assert second.count("Host vastai-101") == 1
    old_block = render_host_block("vastai-101", "203.0.113.7", 20022)
    assert second == first.replace(old_block, new_block)
    assert write_host_block(config, "vastai-101", new_block) == "unchanged"


def test_alias_inside_a_multi_pattern_host_is_not_ours() -> None:
    text = "Host work-box work\n    Port 2222\n"
    updated = upsert_host_block(text, "work", render_host_block("work", "h", 1))
    assert updated.startswith(text) and updated.count("Host work\n") == 1


def test_appends_to_file_without_trailing_newline_and_creates_missing(tmp_path: Path) -> None:
    assert (
        upsert_host_block("Host a\n    Port 1", "b", "Host b\n") == "Host a\n    Port 1\n\nHost b\n"
    )
    config = tmp_path / "new" / ".ssh" / "config"
    write_host_block(config, "vastai-7", render_host_block("vastai-7", "h", 2))
    assert config.read_text().startswith("Host vastai-7\n")
    assert config.stat().st_mode & 0o777 == 0o600


def test_block_has_what_vs_code_needs_and_ssh_accepts(tmp_path: Path) -> None:
    block = render_host_block("vastai-101", "203.0.113.7", 20022, "~/.ssh/vast")
    for line in (
        "HostName 203.0.113.7",
        "Port 20022",
        "User root",
        "IdentityFile ~/.ssh/vast",
        "LocalForward 8080 localhost:6006",
        "ServerAliveInterval 30",
    ):
        assert f"    {line}\n" in block
    config = tmp_path / "config"
    config.write_text(EXISTING.replace("Include ~/.ssh/config.d/*\n", "") + block)
    resolved = subprocess.run(
        ["ssh", "-G", "-F", str(config), "vastai-101"], capture_output=True, text=True, check=True
    ).stdout
    assert "hostname 203.0.113.7" in resolved and "port 20022" in resolved


def test_template_matches_the_rendered_block() -> None:
    template = (REPO_ROOT / "setup" / "ssh_config.template").read_text()
    rendered = render_host_block("ALIAS", "HOST", 12345)
    body = [line.strip() for line in rendered.splitlines()[2:]]
    for line in body:
        assert line.replace("12345", "PORT") in template


def test_bad_alias_is_refused() -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        render_host_block("bad alias", "h", 1)
