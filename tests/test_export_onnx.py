"""ONNX export end to end: real runs, real exporters, onnxruntime against torch, no mocks.

Trained once for the module: the template and a tiny char LM (their experiment files, side
by side as subprocesses); a user's own two-input model is trained in-process through the
trainer API and exported through ``register_export_spec``. The script runs as a user runs
it; what it writes is checked here against torch on inputs it never saw, and loaded by
``OnnxModel`` in a process where ``import torch`` fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from src.config import DataConfig, experiment_schema, load_config
from src.export.builtin_specs import template_spec
from src.export.errors import CheckFailedError, ExportError
from src.export.onnx.format import FP32_TOLERANCE, INT8_TOLERANCE, OnnxFormat
from src.export.pipeline import config_sha256, export_run
from src.export.specs import (
    ExportRun,
    ExportSpec,
    SpecBuilder,
    register_export_spec,
    unregister_export_spec,
)
from src.models import build_model
from src.models.char_gpt import CharGPT, CharGPTConfig
from src.runs.lock import acquire_run_lock
from src.trainers.interruptible_trainer import InterruptibleTrainer
from tests.support.experiment import experiment_env, start_experiment

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPORT_SCRIPT = REPO_ROOT / "scripts" / "export_onnx.py"
CHAR_LM = REPO_ROOT / "experiments" / "char_lm_experiment.py"
INFERENCE_CELLS = REPO_ROOT / "experiments" / "onnx_inference.py"
QUICK = ["trainer.progress_bar=false", "logging.tensorboard=false"]
ENV = experiment_env(OMP_NUM_THREADS="1")  # two processes share two cores


def write_corpus(root: Path) -> None:
    """The char LM's text, outside the repo: other files changing can't change its vocab.
    It holds the characters of the experiment's sampling prompt ("The trainer ")."""
    root.mkdir()
    for name in ("a.md", "b.md"):
        paragraphs = [
            f"The trainer {i} in {name}: a quick brown fox, a lazy dog." for i in range(60)
        ]
        (root / name).write_text("\n\n".join(paragraphs) + "\n")


def start_export(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(EXPORT_SCRIPT), *map(str, args)],
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx_runs")
    write_corpus(root / "corpus")
    common = [f"paths.output_dir={root}", *QUICK]
    template = start_experiment(
        [*common, "run_name=template", "data.num_samples=512", "trainer.max_steps=12"], ENV
    )
    char_lm = start_experiment(
        [
            *common,
            "run_name=char-lm",
            f"data.patterns=['{root / 'corpus'}/*.md']",
            "model.n_layer=1",
            "model.n_head=2",
            "model.n_embd=32",
            "model.block_size=32",
            "data.batch_size=16",
            "trainer.max_steps=8",
        ],
        ENV,
        experiment=CHAR_LM,
    )
    for process in (template, char_lm):
        result = finish(process)
        assert result.returncode == 0, result.stderr
    return {"template": root / "template", "char_lm": root / "char-lm"}


@dataclass
class Exports:
    template: subprocess.CompletedProcess  # scripts/export_onnx.py, as a user runs it
    char_lm_log: list[str]  # export_run's lines, in this process

    def output(self, name: str) -> str:
        return self.template.stdout if name == "template" else "\n".join(self.char_lm_log)


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path]) -> Exports:
    """The README's two commands, side by side: the template through the script (a process
    of its own), the char LM through ``export_run`` here (the call a remote-run hook makes;
    it also pays the exporter's one-time start-up for the other tests of this module)."""
    template = start_export(runs["template"], "--int8")
    char_lm_log: list[str] = []
    try:
        export_run(runs["char_lm"], OnnxFormat(int8=True), "final", log=char_lm_log.append)
    finally:
        result = finish(template)
    return Exports(result, char_lm_log)


# ----- reference models, rebuilt here without src/export ----------------------------------


def torch_model(run_dir: Path, weights: str) -> nn.Module:
    config = json.loads((run_dir / "config.json").read_text())
    state = torch.load(run_dir / weights, map_location="cpu", weights_only=True)
    if "name" in config["model"]:
        data = config["data"]
        model = build_model(
            OmegaConf.create(config["model"]), data["num_features"], data["num_classes"]
        )
    else:
        vocab_size = state["token_embedding.weight"].shape[0]
        model = CharGPT(CharGPTConfig(**config["model"]), vocab_size)
    model.load_state_dict(state)
    return model.eval()


WEIGHTS = {"template": "best_model.pt", "char_lm": "final_model.pt"}


def fresh_inputs(name: str, model: nn.Module, seed: int = 123) -> list[torch.Tensor]:
    """Shapes the exporter's own check did not use."""
    generator = torch.Generator().manual_seed(seed)
    if name == "template":
        return [torch.randn(batch, 32, generator=generator) for batch in (1, 5, 33)]
    vocab_size = model.vocab_size
    shapes = [(1, 2), (5, 11), (33, model.config.block_size)]
    return [torch.randint(1, vocab_size, shape, generator=generator) for shape in shapes]


def max_rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----- the two built-in experiments -------------------------------------------------------


@pytest.mark.parametrize("name", ["template", "char_lm"])
def test_export_matches_torch_at_several_batch_sizes(
    name: str, runs: dict[str, Path], exported: Exports
) -> None:
    assert exported.template.returncode == 0, exported.template.stderr
    output, run_dir = exported.output(name), runs[name]
    assert "exporter: " in output and "fp32 vs torch: max abs error" in output
    meta = json.loads((run_dir / "model.onnx.json").read_text())
    assert meta["sha256"] == sha256(run_dir / "model.onnx")
    config = json.loads((run_dir / "config.json").read_text())
    assert meta["run"]["config_sha256"] == config_sha256(config)
    assert meta["run"]["weights"] == WEIGHTS[name]
    assert meta["exporter"] in ("dynamo", "torchscript") and meta["opset"] >= 17
    assert {"torch", "onnx", "onnxruntime"} <= set(meta["tools"])
    assert meta["check"]["max_rel_error"] <= meta["check"]["tolerance"] == FP32_TOLERANCE
    assert {case["batch"] for case in meta["check"]["cases"]} == {1, 3, 64}
    if name == "template":
        assert meta["inputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", 32]}]
        assert meta["outputs"][0]["shape"] == ["batch", 4]
    else:
        assert meta["inputs"] == [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
        ]
        assert meta["outputs"][0]["shape"][:2] == ["batch", "sequence"]
        assert {case["seq_len"] for case in meta["check"]["cases"]} == {1, 7, 32}
        assert len(meta["vocab"]) + 1 == meta["outputs"][0]["shape"][2]

    model = torch_model(run_dir, WEIGHTS[name])
    session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for inputs in fresh_inputs(name, model):
        with torch.no_grad():
            expected = model(inputs).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_onnx_model_predicts_in_a_process_without_torch(
    runs: dict[str, Path], exported: Exports, tmp_path: Path
) -> None:
    assert exported.template.returncode == 0, exported.template.stderr
    features = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    ids = np.random.default_rng(1).integers(1, 20, (3, 9))
    np.save(tmp_path / "features.npy", features)
    np.save(tmp_path / "ids.npy", ids)
    code = f"""
import sys
sys.modules["torch"] = None  # from here on, `import torch` raises ImportError
try:
    import torch
    raise SystemExit("torch could still be imported")
except ImportError:
    pass
sys.path.insert(0, {str(REPO_ROOT)!r})
import runpy
from pathlib import Path
import numpy as np
from src.export.inference import OnnxModel
out = Path({str(tmp_path)!r})
template = OnnxModel({str(runs["template"] / "model.onnx")!r})
lm = OnnxModel({str(runs["char_lm"] / "model.onnx")!r})
np.save(out / "logits.npy", template(np.load(out / "features.npy")))
np.save(out / "probs0.npy", template.probs(np.load(out / "features.npy")[0]))  # no batch axis
np.save(out / "lm.npy", lm(input_ids=np.load(out / "ids.npy").tolist()))  # lists convert too
runpy.run_path({str(INFERENCE_CELLS)!r})  # the experiments/ cells, as a laptop runs them
print("torch modules:", [m for m, mod in sys.modules.items() if m.startswith("torch") and mod])
"""
    env = {**ENV, "TEMPLATE_RUN": str(runs["template"]), "CHAR_LM_RUN": str(runs["char_lm"])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "torch modules: []" in result.stdout
    assert "predicted classes:" in result.stdout
    assert "--- sample from model.int8.onnx ---" in result.stdout

    template = torch_model(runs["template"], WEIGHTS["template"])
    with torch.no_grad():
        expected = template(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=1e-4, atol=1e-5)
    probs0 = np.load(tmp_path / "probs0.npy")
    np.testing.assert_allclose(probs0, torch.softmax(torch.from_numpy(expected[0]), -1), atol=1e-5)
    lm = torch_model(runs["char_lm"], WEIGHTS["char_lm"])
    with torch.no_grad():
        expected_lm = lm(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "lm.npy"), expected_lm, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["template", "char_lm"])
def test_int8_is_smaller_and_within_its_reported_tolerance(
    name: str, runs: dict[str, Path], exported: Exports
) -> None:
    assert exported.template.returncode == 0, exported.template.stderr
    output, run_dir = exported.output(name), runs[name]
    assert "size: fp32" in output and "test split: fp32" in output
    fp32, int8 = run_dir / "model.onnx", run_dir / "model.int8.onnx"
    assert int8.stat().st_size < fp32.stat().st_size
    meta = json.loads((run_dir / "model.int8.onnx.json").read_text())
    assert meta["sha256"] == sha256(int8) and meta["precision"].startswith("int8")
    tolerance = meta["check"]["tolerance"]
    assert tolerance == INT8_TOLERANCE and meta["check"]["max_rel_error"] <= tolerance
    test_split = meta["test_split"]
    assert set(test_split) == {"fp32", "int8", "change"}
    for metric in ("loss", "accuracy"):
        change = test_split["int8"][metric] - test_split["fp32"][metric]
        assert test_split["change"][metric] == pytest.approx(change)
    assert abs(test_split["change"]["loss"]) < 0.1  # a broken int8 graph moves it by far more

    model = torch_model(run_dir, WEIGHTS[name])
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    for inputs in fresh_inputs(name, model, seed=7):
        with torch.no_grad():
            expected = model(inputs).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
        assert max_rel_error(got, expected) <= tolerance


# ----- a user's own model, through the documented API -------------------------------------


@dataclass
class BagConfig:
    """A user's `model:` section."""

    bag_dim: int = 16
    vocab_size: int = 20


@dataclass
class BagData(DataConfig):
    max_len: int = 12


class BagOfTokens(nn.Module):
    """A user's own model: token ids and a padding mask in, two class logits out."""

    def __init__(self, settings: BagConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(settings.vocab_size, settings.bag_dim)
        self.head = nn.Linear(settings.bag_dim, 2)

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        keep = (~padding_mask).unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.head(pooled)


def bag_batch(batch: int, length: int, vocab: int, generator: torch.Generator):
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    padding_mask = torch.arange(length)[None, :] >= lengths[:, None]
    return ids.masked_fill(padding_mask, 0), padding_mask


class BagSequences(Dataset):
    """Label: more 1s than 2s. Samples are batches of one, so no collate is needed."""

    def __init__(self, size: int, settings: BagData, vocab: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids, self.mask = bag_batch(size, settings.max_len, vocab, generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        label = ((ids == 1).sum() > (ids == 2).sum()).long()
        return {"input_ids": ids, "padding_mask": self.mask[index], "label": label}


def bag_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"], batch["padding_mask"]), batch["label"])


def bag_spec(run: ExportRun) -> ExportSpec:
    """The user's spec builder: rebuild the model from config.json + weights, make inputs."""
    settings = BagConfig(**run.config["model"])
    model = BagOfTokens(settings)
    model.load_state_dict(run.state_dict)

    def make_inputs(batch: int, length: int | None, generator: torch.Generator):
        return bag_batch(batch, length or 12, settings.vocab_size, generator)

    return ExportSpec(
        model=model,
        input_names=["input_ids", "padding_mask"],
        output_names=["logits"],
        example_inputs=make_inputs(2, 6, torch.Generator().manual_seed(0)),
        make_inputs=make_inputs,
        seq_lengths=(1, 4, 12),
        # The output has no sequence axis, so the default (batch + sequence everywhere) won't do.
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "padding_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"},
        },
        metadata={"labels": ["not more 1s", "more 1s"]},
    )


def test_users_own_model_exports_through_register_export_spec(tmp_path: Path) -> None:
    config_file = tmp_path / "bag.yaml"
    config_file.write_text(f"run_name: bag\npaths:\n  output_dir: {tmp_path}\n")
    cfg = load_config(
        config_file,
        ["trainer.max_steps=6", "data.batch_size=32", *QUICK],
        schema=experiment_schema(BagConfig, BagData),
    )
    torch.manual_seed(0)
    settings = BagConfig()
    trainer = InterruptibleTrainer(
        cfg,
        BagOfTokens(settings),
        BagSequences(256, BagData(), settings.vocab_size, seed=1),
        BagSequences(64, BagData(), settings.vocab_size, seed=2),
        step_fn=bag_step,
    )
    assert trainer.fit().status == "completed"
    run_dir = tmp_path / "bag"

    register_export_spec("bag_of_tokens", lambda config: "bag_dim" in config["model"], bag_spec)
    lines: list[str] = []
    try:
        result = export_run(run_dir, "onnx", log=lines.append)  # found from the run's config
    finally:
        unregister_export_spec("bag_of_tokens")
    meta = result.metadata
    assert meta["run"]["spec"] == "bag_of_tokens" and meta["labels"][1] == "more 1s"
    assert [(item["name"], item["dtype"], item["shape"]) for item in meta["inputs"]] == [
        ("input_ids", "int64", ["batch", "sequence"]),
        ("padding_mask", "bool", ["batch", "sequence"]),
    ]
    assert meta["outputs"][0]["shape"] == ["batch", 2]
    assert any(line.startswith("fp32 vs torch:") for line in lines)

    from src.export.inference import OnnxModel

    onnx_model = OnnxModel(run_dir / "model.onnx")
    torch_bag = BagOfTokens(settings)
    torch_bag.load_state_dict(torch.load(run_dir / "best_model.pt", weights_only=True))
    ids, mask = bag_batch(7, 10, settings.vocab_size, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch_bag(ids, mask).numpy()
    got = onnx_model(ids.numpy(), padding_mask=mask.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


class AfterTemplate(nn.Module):
    """The template's MLP with one thing after it (each subclass: one thing exporters hit)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


def template_spec_with(wrapper: type[AfterTemplate]) -> SpecBuilder:
    """A spec builder as a user writes one: the built-in template spec, another model."""

    def build(run: ExportRun) -> ExportSpec:
        spec = template_spec(run)
        spec.model = wrapper(spec.model)
        return spec

    return build


class DataDependentBranch(AfterTemplate):
    """torch.export can't decide a branch on tensor values; tracing records the one taken."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.abs().sum() >= 0:  # always true, but only known at run time
            return self.inner(features)
        return -self.inner(features)


def test_dynamo_failure_falls_back_to_torchscript_and_says_so(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = copy_run(runs["template"], tmp_path / "run")
    lines: list[str] = []
    result = export_run(
        run_dir, "onnx", spec=template_spec_with(DataDependentBranch), log=lines.append
    )
    assert result.metadata["exporter"] == "torchscript"
    assert "data-dependent" in result.metadata["exporter_note"]
    said = [line for line in lines if line.startswith("exporter: ")]
    assert said == [
        f"exporter: torchscript (classic); dynamo could not: {result.metadata['exporter_note']}"
    ]
    assert result.metadata["check"]["max_rel_error"] <= FP32_TOLERANCE
    assert (run_dir / "model.onnx").is_file() and (run_dir / "model.onnx.json").is_file()


class Noisy(AfterTemplate):
    """Exports fine, but ONNX draws other random numbers than torch: the check must refuse."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.inner(features)
        return logits + torch.rand_like(logits)


def test_export_that_disagrees_with_torch_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_run(runs["template"], tmp_path / "run")
    with pytest.raises(CheckFailedError) as raised:
        export_run(
            run_dir,
            OnnxFormat(exporter="torchscript"),
            spec=template_spec_with(Noisy),
            log=lambda line: None,
        )
    assert raised.value.exit_code == 1 and "\n" not in raised.value.line
    assert raised.value.line.startswith("error: the exported model disagrees with torch: ")
    assert f"> tolerance {FP32_TOLERANCE:g}" in raised.value.line
    assert [path.name for path in run_dir.iterdir() if ".onnx" in path.name] == []


# ----- bad input: one line, non-zero exit, nothing written --------------------------------


class Eigenvalues(AfterTemplate):
    """eigvalsh has no ONNX op and no decomposition in either exporter."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.inner(features)
        return logits + torch.linalg.eigvalsh(logits.T @ logits).sum()


# For ``spec="tests.test_export_onnx:unsupported_op_spec"``: specs are found by name too.
unsupported_op_spec = template_spec_with(Eigenvalues)


def copy_run(run_dir: Path, target: Path) -> Path:
    """The run as training left it (no exports), somewhere a test may break it."""
    return Path(shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("model*.onnx*")))


BAD_INPUTS = {
    # case: (what to break, extra arguments, words the error must contain)
    "no run directory": ("missing", [], "does not exist"),
    "no config.json": ("config.json", [], "not a run directory"),
    "no weights": ("weights", [], "has no weights"),
    "unfinished run": ("final_model.pt", [], "is unfinished"),
    "still training": ("lock", [], "is still training"),
    "no such best_model": ("best_model.pt", [], "export --weights final instead"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    broken, extra, words = BAD_INPUTS[case]
    run_dir = copy_run(runs["template"], tmp_path / "run")
    lock = None
    if broken == "missing":
        shutil.rmtree(run_dir)
    elif broken == "weights":
        for name in ("best_model.pt", "final_model.pt"):
            (run_dir / name).unlink()
        shutil.rmtree(run_dir / "checkpoints")
    elif broken == "lock":
        lock = acquire_run_lock(run_dir)  # as the trainer holds it while training
    elif broken is not None:
        (run_dir / broken).unlink()
    try:
        result = finish(start_export(run_dir, *extra))
    finally:
        if lock is not None:
            lock.release()
    check_failed_cleanly(result, run_dir, words)


def check_failed_cleanly(result: subprocess.CompletedProcess, run_dir: Path, words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0]
    if run_dir.exists():  # no model.onnx, no temp file, no sidecar
        left = [path.name for path in run_dir.iterdir() if ".onnx" in path.name]
        assert left == [], left


def test_op_no_exporter_converts_is_one_line_and_writes_nothing(
    runs: dict[str, Path], exported: Exports, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """Both exporters are tried; their dumps (TorchScript prints its graph from C++) stay
    out of the terminal, so what the user sees is the one line. In-process to share the
    exporter start-up paid by ``exported``; the script prints ``error.line`` and exits
    with ``error.exit_code`` for every ExportError, as the cases above show."""
    run_dir = copy_run(runs["template"], tmp_path / "run")
    capfd.readouterr()
    with pytest.raises(ExportError) as raised:
        export_run(run_dir, "onnx", spec="tests.test_export_onnx:unsupported_op_spec", log=print)
    line = raised.value.line
    assert raised.value.exit_code == 2 and "\n" not in line
    assert line.startswith("error: cannot export Eigenvalues to ONNX (dynamo exporter: ")
    assert "linalg_eigh" in line and "; TorchScript exporter: " in line
    out, err = capfd.readouterr()
    assert err == "" and out.splitlines() == [
        f"exporting best_model.pt of {run_dir} (Eigenvalues, spec "
        "tests.test_export_onnx:unsupported_op_spec)"
    ]
    assert [path.name for path in run_dir.iterdir() if ".onnx" in path.name] == []
