"""Run each experiment cell by cell in a real Jupyter kernel, like VS Code's Run Cell.

The file is split on its `# %%` markers (jupytext's percent format, the one VS Code
uses) and each code cell is sent, in order, to an IPython kernel started in the repo
root (``jupyter.notebookFileRoot = ${workspaceFolder}``). Any cell error fails the test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import jupytext
import pytest
from jupyter_client.manager import start_new_kernel

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A copy of the code, so the notebook's default outputs/ lands in a temp dir."""
    for folder in ("src", "configs", "experiments", "data"):
        shutil.copytree(
            REPO_ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    return tmp_path


def run_cells(
    repo: Path,
    set_file: bool,
    experiment: str = "template_experiment.py",
    extra: Sequence[str] = (),
) -> list[str]:
    path = repo / "experiments" / experiment
    notebook = jupytext.read(path, fmt="py:percent")
    code_cells = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code_cells) >= 6, "expected setup, data, model, train, evaluate, inspect cells"
    # Edit the overrides line, as a user would, so a machine that has /workspace (a Vast.ai
    # box) keeps its real runs out of this test.
    default_line = "overrides: list[str] = []"
    assert default_line in code_cells[0]
    output_dir = repo / "outputs"
    overrides = [f"paths.output_dir={output_dir}", *extra]
    code_cells[0] = code_cells[0].replace(default_line, f"overrides = {overrides!r}")
    env = {"DEV_MODE": "True", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"}
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(repo), env=env)
    outputs: list[str] = []
    try:
        if set_file:  # what VS Code's Interactive Window does before running a file's cells
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


def check_template(run_dir: Path, outputs: list[str]) -> None:
    results = json.loads((run_dir / "test_results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert any("test_loss" in text for text in outputs)
    assert (run_dir / "final_model.pt").is_file()


def check_char_lm(run_dir: Path, outputs: list[str]) -> None:
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["test_loss"] > 0 and results["test_perplexity"] >= 1.0
    assert any("test_perplexity" in text for text in outputs)
    sample = outputs[-1].split("--- sample ---\n", 1)[-1]  # the last cell samples text
    assert sample.startswith("The trainer ") and len(sample.strip()) > len("The trainer ") + 100
    assert (run_dir / "best_model.pt").is_file() and (run_dir / "final_model.pt").is_file()


def check_llm_sft(run_dir: Path, outputs: list[str]) -> None:
    results = json.loads((run_dir / "test_results.json").read_text())
    # tiny-llama starts near uniform over its 260 ids (loss ~5.56); a few LoRA steps lower it.
    assert 1.0 < results["test_perplexity"] < 240 and results["test_loss"] > 0
    assert any("first sample trains on:" in text for text in outputs)
    assert "--- What is the capital of France? ---\n" in outputs[-1]  # the last cell generates


# file -> (run_name in its dev config, overrides that keep the test short, the checks)
EXPERIMENTS: dict[str, tuple[str, list[str], Callable[[Path, list[str]], None]]] = {
    "template_experiment.py": ("template-dev", [], check_template),
    "char_lm_experiment.py": ("char-lm-dev", ["trainer.max_steps=20"], check_char_lm),
    "llm_sft_experiment.py": (
        "llm-sft-dev",
        ["trainer.max_steps=12", "checkpoint.every_n_steps=6"],
        check_llm_sft,
    ),
}


# Both ways of finding the repo root (VS Code's __file__, a plain kernel's cwd) on the
# template; the char LM's setup cell is the same code, so it runs the VS Code way only.
@pytest.mark.parametrize(
    ("experiment", "set_file"),
    [
        ("template_experiment.py", True),
        ("template_experiment.py", False),
        ("char_lm_experiment.py", True),
        ("llm_sft_experiment.py", True),
    ],
    ids=[
        "template-vscode-__file__",
        "template-plain-kernel",
        "char_lm-vscode-__file__",
        "llm_sft-vscode-__file__",
    ],
)
def test_cells_run_in_order_in_a_kernel(repo_copy: Path, set_file: bool, experiment: str) -> None:
    run_name, extra, check = EXPERIMENTS[experiment]
    outputs = run_cells(repo_copy, set_file, experiment, extra)
    check(repo_copy / "outputs" / run_name, outputs)
