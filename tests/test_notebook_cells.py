"""Run the template experiment cell by cell in a real Jupyter kernel, like VS Code's Run Cell.

The file is split on its `# %%` markers (jupytext's percent format, the one VS Code
uses) and each code cell is sent, in order, to an IPython kernel started in the repo
root (``jupyter.notebookFileRoot = ${workspaceFolder}``). Any cell error fails the test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jupytext
import pytest
from jupyter_client.manager import start_new_kernel

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A copy of the code, so the notebook's default outputs/ lands in a temp dir."""
    for folder in ("src", "configs", "experiments"):
        shutil.copytree(
            REPO_ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    return tmp_path


def run_cells(repo: Path, set_file: bool) -> list[str]:
    notebook = jupytext.read(repo / "experiments" / "template_experiment.py", fmt="py:percent")
    code_cells = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code_cells) >= 6, "expected setup, data, model, train, evaluate, inspect cells"
    # Edit the overrides line, as a user would, so a machine that has /workspace (a Vast.ai
    # box) keeps its real runs out of this test.
    default_line = "overrides: list[str] = []"
    assert default_line in code_cells[0]
    output_dir = repo / "outputs"
    code_cells[0] = code_cells[0].replace(
        default_line, f"overrides = ['paths.output_dir={output_dir}']"
    )
    env = {"DEV_MODE": "True", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"}
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(repo), env=env)
    outputs: list[str] = []
    try:
        if set_file:  # what VS Code's Interactive Window does before running a file's cells
            path = repo / "experiments" / "template_experiment.py"
            client.execute_interactive(f"__file__ = {str(path)!r}", timeout=60)
        for index, source in enumerate(code_cells):
            texts: list[str] = []

            def collect(message: dict, sink: list[str] = texts) -> None:
                if message["msg_type"] == "stream":
                    sink.append(message["content"]["text"])
                elif message["msg_type"] == "error":
                    sink.append("\n".join(message["content"]["traceback"]))

            reply = client.execute_interactive(source, timeout=300, output_hook=collect)
            output = "".join(texts)
            assert reply["content"]["status"] == "ok", f"cell {index} failed:\n{source}\n{output}"
            outputs.append(output)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return outputs


@pytest.mark.parametrize("set_file", [True, False], ids=["vscode-__file__", "plain-kernel"])
def test_cells_run_in_order_in_a_kernel(repo_copy: Path, set_file: bool) -> None:
    outputs = run_cells(repo_copy, set_file)
    run_dir = repo_copy / "outputs" / "template-dev"
    results = json.loads((run_dir / "test_results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert any("test_loss" in text for text in outputs)
    assert (run_dir / "final_model.pt").is_file()
