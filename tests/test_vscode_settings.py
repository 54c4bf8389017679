"""The .vscode files parse (JSON with comments) and hold the settings the cells rely on."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_jsonc(path: Path) -> dict:
    text = re.sub(r"^\s*//.*$", "", path.read_text(), flags=re.MULTILINE)
    return json.loads(text)


def test_settings_make_cells_run_from_the_repo_root() -> None:
    settings = read_jsonc(REPO_ROOT / ".vscode" / "settings.json")
    assert settings["jupyter.notebookFileRoot"] == "${workspaceFolder}"
    assert settings["python.envFile"] == "${workspaceFolder}/.env"
    assert settings["jupyter.interactiveWindow.textEditor.executeSelection"] is True


def test_extension_lists_agree() -> None:
    recommended = read_jsonc(REPO_ROOT / ".vscode" / "extensions.json")["recommendations"]
    listed = (REPO_ROOT / "setup" / "vscode_extensions.txt").read_text().split()
    assert recommended == listed
    assert {"ms-vscode-remote.remote-ssh", "ms-python.python", "ms-toolsai.jupyter"} <= set(listed)


def test_launch_configs_use_debugpy() -> None:
    configurations = read_jsonc(REPO_ROOT / ".vscode" / "launch.json")["configurations"]
    assert configurations and all(c["type"] == "debugpy" for c in configurations)
