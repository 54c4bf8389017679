"""Add or update one ``Host`` block in ~/.ssh/config, leaving every other byte as it was.

VS Code Remote-SSH reads ~/.ssh/config, so `ssh-config ID` writes the instance there. Users
keep hand-written entries in that file; rewriting it through a parser would reflow them.
Here the file is treated as text: only the lines of the block whose ``Host`` line names
exactly our alias are replaced, and a new block goes before a catch-all ``Host *`` (OpenSSH
uses the first value it finds, so a block after ``Host *`` would lose to it).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

MARKER = "# managed by scripts/launch_vast.py ssh-config"
_BLOCK_START = re.compile(r"^\s*(host|match)\b", re.IGNORECASE)
_ALIAS_OK = re.compile(r"^[A-Za-z0-9._-]+$")


def render_host_block(
    alias: str,
    hostname: str,
    port: int,
    identity_file: str = "~/.ssh/id_ed25519",
    user: str = "root",
) -> str:
    """The block for one instance; setup/ssh_config.template shows the same lines."""
    if not _ALIAS_OK.match(alias):
        raise ValueError(f"alias {alias!r} may only hold letters, digits and . _ -")
    return (
        f"Host {alias}\n"
        f"    {MARKER}\n"
        f"    HostName {hostname}\n"
        f"    Port {int(port)}\n"
        f"    User {user}\n"
        f"    IdentityFile {identity_file}\n"
        f"    IdentitiesOnly yes\n"
        f"    LocalForward 8080 localhost:6006\n"
        f"    ServerAliveInterval 30\n"
        f"    ServerAliveCountMax 4\n"
    )


def _block_spans(lines: list[str]) -> list[tuple[int, int, list[str]]]:
    """(start, end, patterns) of each Host/Match block; end excludes trailing blanks/comments."""
    starts = [i for i, line in enumerate(lines) if _BLOCK_START.match(line)]
    spans = []
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(lines)
        # Blank lines and comments just above the next block belong to that block.
        while end > start + 1 and (
            not lines[end - 1].strip() or lines[end - 1].lstrip()[:1] == "#"
        ):
            end -= 1
        keyword, _, rest = lines[start].strip().partition(" ")
        patterns = rest.split() if keyword.lower() == "host" else []
        spans.append((start, end, patterns))
    return spans


def upsert_host_block(config_text: str, alias: str, block: str) -> str:
    """``config_text`` with the ``Host alias`` block replaced (or inserted); the rest unchanged."""
    lines = config_text.splitlines(keepends=True)
    block_lines = block.splitlines(keepends=True)
    spans = _block_spans(lines)
    for start, end, patterns in spans:
        if patterns == [alias]:
            return "".join(lines[:start] + block_lines + lines[end:])
    catch_all = next((start for start, _, patterns in spans if patterns == ["*"]), None)
    if catch_all is not None:
        # Insert above the comments that introduce ``Host *``, with one blank line after.
        insert_at = catch_all
        while insert_at > 0 and lines[insert_at - 1].lstrip()[:1] == "#":
            insert_at -= 1
        return "".join(lines[:insert_at] + block_lines + ["\n"] + lines[insert_at:])
    prefix = config_text
    if prefix and not prefix.endswith("\n"):
        prefix += "\n"
    if prefix and not prefix.endswith("\n\n"):
        prefix += "\n"
    return prefix + block


def write_host_block(config_path: Path, alias: str, block: str) -> str:
    """Atomically update the file (mode 600); returns 'added', 'updated' or 'unchanged'."""
    config_path = config_path.expanduser()
    old_text = config_path.read_text() if config_path.exists() else ""
    new_text = upsert_host_block(old_text, alias, block)
    if new_text == old_text:
        return "unchanged"
    existed = any(patterns == [alias] for _, _, patterns in _block_spans(old_text.splitlines()))
    config_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = config_path.stat().st_mode & 0o777 if config_path.exists() else 0o600
    fd, tmp_name = tempfile.mkstemp(dir=config_path.parent, prefix=".config.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(new_text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, config_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return "updated" if existed else "added"
