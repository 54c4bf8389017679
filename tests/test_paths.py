"""Where outputs go: the /workspace volume, or the local fallback with one line saying so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from src.common import paths
from src.common.paths import VOLUME_ROOT, resolve_persistent_dir


@pytest.mark.skipif(VOLUME_ROOT.is_dir(), reason="this machine has a /workspace volume")
def test_workspace_default_falls_back_with_one_line_once(tmp_path: Path, capsys) -> None:
    paths._announced_fallbacks.clear()
    fallback = tmp_path / "outputs"
    for _ in range(2):  # config check, then run-dir creation: the user sees it once
        assert resolve_persistent_dir("/workspace/persistent", fallback) == fallback
    err = capsys.readouterr().err
    assert err == (
        "[paths] /workspace/persistent is not available (no /workspace volume here); "
        f"writing outputs to {fallback}\n"
    )
    assert fallback.is_dir() and not VOLUME_ROOT.exists()


def test_explicit_dirs_are_absolute_and_never_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_persistent_dir("relative/out", tmp_path / "fb") == tmp_path / "relative/out"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"choose another with sweep\.output_dir="):
        resolve_persistent_dir(blocker / "sub", tmp_path / "fb", setting="sweep.output_dir")
    assert not (tmp_path / "fb").exists()
    assert os.path.isabs(resolve_persistent_dir("~", tmp_path / "fb"))
