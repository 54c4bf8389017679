"""``--format hf``: a real LoRA SFT run (tiny Llama, trained once for the module in-process
through the same code as experiments/llm_sft_experiment.py) exported as its adapter, as a
merged model checked against the adapter model, and as GGUF through a fake llama.cpp
checkout; refusals leave the run directory as it was. Also the pieces remote_train uses to
bring an export home verified (its options read without torch, the sidecar check), tested
directly: a real remote hf run would add a training and an export on the test sshd host.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from src.common.paths import REPO_ROOT
from src.config import experiment_schema, load_config
from src.data.chat import ChatCollator, ChatDataConfig, build_chat_datasets
from src.export.arguments import format_from_options
from src.export.cli import main as export_main
from src.export.errors import EXIT_CHECK_FAILED, CheckFailedError, ExportError
from src.export.hf import merge
from src.export.hf.format import HF_EXPORT, TOLERANCES, HfFormat
from src.export.pipeline import export_run
from src.export.sidecar import check_against_sidecar
from src.models.llm import LlmConfig, build_lora_model, load_base_model, load_tokenizer
from src.models.llm_steps import make_optimizer, sft_eval, sft_step
from src.remote.args import UsageError, parse_args
from src.remote.pipeline import check_exports_home
from src.remote.stages import StageError
from src.trainers.interruptible_trainer import InterruptibleTrainer
from tests.support.experiment import experiment_env

# PEFT asks transformers 5 a deprecated question when it wraps a model; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
RUN_NAME = "llm-sft-dev"
RUN_FILES = ("config.json", "best_adapter", "final_adapter", "checkpoints")
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def one_thread():
    """A 0.2M-parameter model runs several times faster on one thread on a small CPU box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev SFT run (tiny-llama, all-linear LoRA), 12 steps, as the experiment trains it."""
    output_dir = tmp_path_factory.mktemp("sft")
    cfg = load_config(
        REPO_ROOT / "configs" / "llm_sft_dev.yaml",
        [
            f"paths.output_dir={output_dir}",
            "trainer.max_steps=12",
            "trainer.log_every_n_steps=6",
            "checkpoint.every_n_steps=6",
            "trainer.progress_bar=false",
            "logging.tensorboard=false",
        ],
        schema=experiment_schema(LlmConfig, ChatDataConfig),
    )
    model_cfg = LlmConfig.from_section(cfg.model)
    tokenizer = load_tokenizer(model_cfg)
    data = build_chat_datasets(cfg.data, tokenizer, root=REPO_ROOT)
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = InterruptibleTrainer(
        cfg,
        build_lora_model(model_cfg),
        data.train,
        data.val,
        collate_fn=ChatCollator(tokenizer.pad_token_id),
        step_fn=sft_step,
        eval_fn=sft_eval,
        optimizer_fn=partial(make_optimizer, optim_cfg=cfg.optim),
    )
    result = trainer.fit()
    torch.set_num_threads(threads)
    assert not result.interrupted and result.run_dir.name == RUN_NAME
    assert (result.run_dir / "best_adapter").is_dir() and (
        result.run_dir / "final_adapter"
    ).is_dir()
    return result.run_dir


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run, for a test to export into."""
    copy = tmp_path / "outputs" / RUN_NAME
    copy.mkdir(parents=True)
    for name in RUN_FILES:
        source = trained / name
        if source.is_dir():
            shutil.copytree(source, copy / name)
        else:
            shutil.copy2(source, copy / name)
    return copy


def listing(run_dir: Path) -> dict[str, bytes]:
    """Every file under the run directory (hidden ones included) with its bytes."""
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.name != ".run.lock"
    }


def adapter_logits(run_dir: Path, adapter: Path, dtype: torch.dtype) -> torch.Tensor:
    """The logits of the base + adapter, loaded the way PEFT users load it."""
    cfg = LlmConfig.from_section(json.loads((run_dir / "config.json").read_text())["model"])
    model = PeftModel.from_pretrained(load_base_model(cfg, dtype=dtype), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def test_adapter_export_is_the_adapter_byte_for_byte_and_loads_in_peft(run: Path) -> None:
    lines: list[str] = []
    result = export_run(run, "hf", weights="final", log=lines.append)
    out = run / HF_EXPORT
    assert result.path == out and sorted(p.name for p in out.iterdir()) == ["adapter"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "adapter" / name).read_bytes() == (run / "final_adapter" / name).read_bytes()
    meta = json.loads((run / f"{HF_EXPORT}.json").read_text())
    assert meta["kind"] == "directory" and meta["hf"]["adapter"]["from"] == "final_adapter"
    assert meta["run"]["weights"] == "final_adapter/adapter_model.safetensors"
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(meta["files"]) == on_disk and meta["size_bytes"] == sum(
        entry["size_bytes"] for entry in meta["files"].values()
    )
    assert check_against_sidecar(out) == []
    assert any("export_hf/adapter/" in line for line in lines)

    exported = adapter_logits(run, out / "adapter", torch.float32)
    assert torch.equal(exported, adapter_logits(run, run / "final_adapter", torch.float32))
    base = load_base_model(LlmConfig()).eval()
    with torch.no_grad():
        assert not torch.allclose(exported, base(input_ids=TOKENS).logits, atol=1e-3)


def test_merged_export_matches_the_adapter_model_and_reloads_with_auto_classes(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert export_main([str(run), "--format", "hf"]) == 0  # an older, adapter-only export
    argv = [str(run), "--format", "hf", "--merge", "--max-shard-size", "200KB"]
    assert export_main(argv) == 0
    out = capsys.readouterr().out
    print(out)
    error = re.search(r"merged vs adapter model \(bf16\): max abs error (\S+), relative (\S+)", out)
    assert error, out
    assert float(error.group(2)) <= TOLERANCES["bf16"]

    merged = run / HF_EXPORT / "merged"
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded at 200KB
    meta = json.loads((run / f"{HF_EXPORT}.json").read_text())["hf"]["merged"]
    assert meta["dtype"] == "bf16" and meta["base"]["name_or_path"] == "tiny-llama"
    assert meta["check"]["max_rel_error"] <= TOLERANCES["bf16"] and meta["shards"] > 1
    assert check_against_sidecar(run / HF_EXPORT) == []
    hidden = [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".run.lock"]
    assert hidden == []  # the older export was swapped out and removed, no temp left

    # Loaded as its users load it, against the fp32 adapter model built independently here.
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits.float()
    reference = adapter_logits(run, run / "best_adapter", torch.float32)
    assert (logits - reference).abs().max() <= TOLERANCES["bf16"] * reference.abs().max()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    text = "Paris, naïvely?"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == load_tokenizer(
        LlmConfig()
    ).apply_chat_template(messages, tokenize=False)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_a_4bit_run_merges_into_an_unquantized_base(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    config["model"]["load_in_4bit"] = True  # as a QLoRA run records it (no GPU needed here)
    config["model"]["dpo_beta"] = 0.1  # a DPO run's extra key is ignored
    (run / "config.json").write_text(json.dumps(config))
    lines: list[str] = []
    export_run(run, HfFormat(merge=True, dtype="fp16"), log=lines.append)
    assert any("reloaded unquantized: never merged into 4-bit" in line for line in lines)
    meta = json.loads((run / f"{HF_EXPORT}.json").read_text())["hf"]["merged"]
    assert meta["base_trained_in_4bit"] and meta["dtype"] == "fp16"
    assert meta["check"]["max_rel_error"] <= TOLERANCES["fp16"]
    model_config = json.loads((run / HF_EXPORT / "merged" / "config.json").read_text())
    assert "quantization_config" not in model_config and model_config["dtype"] == "float16"


def test_a_corrupted_merge_is_refused_and_an_older_export_stays(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_run(run, "hf", log=lambda _: None)
    before = listing(run)
    honest = merge.merge_weights

    def corrupted(model):
        merged = honest(model)
        with torch.no_grad():
            merged.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        return merged

    monkeypatch.setattr(merge, "merge_weights", corrupted)
    with pytest.raises(CheckFailedError) as refused:
        export_run(run, HfFormat(merge=True, dtype="fp32"), log=lambda _: None)
    line = refused.value.line
    assert "merged model disagrees with the adapter model" in line and "\n" not in line
    assert refused.value.exit_code == EXIT_CHECK_FAILED
    assert listing(run) == before  # the adapter-only export as it was, no temp left


def test_tolerance_zero_in_bf16_exits_1_with_one_line_and_writes_nothing(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = listing(run)
    argv = [str(run), "--format", "hf", "--merge", "--tolerance", "0"]
    assert export_main(argv) == EXIT_CHECK_FAILED
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "> --tolerance 0 (bf16)" in captured.err
    assert "max abs error" in captured.out  # printed before the refusal
    assert listing(run) == before


def test_gguf_without_llama_cpp_is_one_line_and_writes_nothing(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = listing(run)
    env = experiment_env()
    env.pop("LLAMA_CPP_DIR", None)
    script = REPO_ROOT / "scripts" / "export.py"
    done = subprocess.run(
        [sys.executable, str(script), str(run), "--format", "hf", "--gguf"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "--gguf needs llama.cpp's convert_hf_to_gguf.py" in done.stderr
    assert "git clone https://github.com/ggml-org/llama.cpp" in done.stderr
    assert "pip install -r llama.cpp/requirements.txt" in done.stderr
    assert listing(run) == before

    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ExportError, match=r"LLAMA_CPP_DIR .*nowhere: no convert_hf_to_gguf.py"):
        export_run(run, HfFormat(gguf=True), log=lambda _: None)
    assert listing(run) == before


FAKE_CONVERTER = """\
import json, sys
from pathlib import Path
args = sys.argv[1:]
merged = Path(args[0])
record = {"argv": args, "merged_files": sorted(p.name for p in merged.iterdir())}
Path(__file__).with_name("calls.json").write_text(json.dumps(record))
if "--fail" in Path(__file__).read_text().split("#")[-1]:
    print("loading model...", flush=True)
    sys.exit("ValueError: unknown architecture")
outfile = Path(args[args.index("--outfile") + 1])
outfile.write_bytes(b"GGUF" + bytes(60))
# flags:
"""


def fake_llama_cpp(root: Path, flags: str = "") -> Path:
    root.mkdir()
    (root / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER + flags)
    return root


def test_gguf_runs_the_converter_on_the_merged_model(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama_cpp = fake_llama_cpp(tmp_path / "llama.cpp")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(llama_cpp))
    export_run(run, HfFormat(gguf=True, gguf_type="q8_0"), log=lambda _: None)  # merge implied
    call = json.loads((llama_cpp / "calls.json").read_text())
    merged_arg, rest = call["argv"][0], call["argv"][1:]
    assert Path(merged_arg).name == "merged" and Path(merged_arg).parent.name.startswith(
        f".{HF_EXPORT}."
    )  # the staged export, before it is renamed into place
    assert "config.json" in call["merged_files"] and "tokenizer.json" in call["merged_files"]
    outfile = Path(rest[rest.index("--outfile") + 1])
    assert outfile.name == f"{RUN_NAME}-q8_0.gguf" and outfile.parent == Path(merged_arg).parent
    assert rest[rest.index("--outtype") + 1] == "q8_0"
    gguf = run / HF_EXPORT / f"{RUN_NAME}-q8_0.gguf"
    assert gguf.read_bytes().startswith(b"GGUF")
    meta = json.loads((run / f"{HF_EXPORT}.json").read_text())
    assert meta["hf"]["gguf"]["outtype"] == "q8_0" and gguf.name in meta["files"]
    assert (run / HF_EXPORT / "merged" / "config.json").is_file()

    before = listing(run)
    failing = fake_llama_cpp(tmp_path / "broken", flags="--fail")
    with pytest.raises(ExportError) as refused:
        export_run(run, HfFormat(gguf=True, llama_cpp=str(failing)), log=lambda _: None)
    assert "exited with code 1: ValueError: unknown architecture" in refused.value.line
    assert listing(run) == before


def test_run_checks_name_the_wrong_kind_of_run(run: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"run_name": "plain", "model": {}}))
    torch.save({}, plain / "final_model.pt")
    with pytest.raises(ExportError, match=r"not a PEFT \(LoRA\) run \(it has final_model.pt"):
        export_run(plain, "hf", log=lambda _: None)
    with pytest.raises(ExportError, match=r"is a PEFT \(LoRA\) run: .*use --format hf"):
        export_run(run, "onnx", log=lambda _: None)
    with pytest.raises(ExportError, match="--spec does not apply to --format hf"):
        export_run(run, "hf", spec="src.models:build_model", log=lambda _: None)
    shutil.rmtree(run / "best_adapter")
    with pytest.raises(ExportError, match=r"has no best_adapter/: export --weights final"):
        export_run(run, "hf", log=lambda _: None)
    shutil.rmtree(run / "final_adapter")
    with pytest.raises(ExportError, match=r"unfinished \(no final_adapter/, newest checkpoint"):
        export_run(run, "hf", weights="final", log=lambda _: None)
    assert not (run / HF_EXPORT).exists()


def test_an_export_home_is_checked_against_its_sidecar(run: Path, tmp_path: Path) -> None:
    """What remote_train's verify stage does once the run directory came home."""
    export_run(run, "hf", log=lambda _: None)
    remote_root = run.parent
    home_root = tmp_path / "home"
    shutil.copytree(remote_root, home_root)
    pairs = [(str(remote_root), home_root)]
    assert check_exports_home("hf", ["--weights", "final"], [str(run)], pairs) == 1

    home_adapter = home_root / RUN_NAME / HF_EXPORT / "adapter"
    (home_adapter / "stray.txt").write_text("not exported")
    with pytest.raises(StageError, match=r"stray.txt: not in export_hf.json"):
        check_exports_home("hf", [], [str(run)], pairs)
    (home_adapter / "stray.txt").unlink()
    weights = home_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(StageError, match=r"adapter_model.safetensors: sha256 differs"):
        check_exports_home("hf", [], [str(run)], pairs)

    assert format_from_options("hf", ["--gguf"]).merge  # --gguf implies --merge
    with pytest.raises(ExportError, match="--gguf-type: invalid choice: 'q4'"):
        format_from_options("hf", ["--gguf-type", "q4"])
    experiment = "experiments/llm_sft_experiment.py"
    with pytest.raises(UsageError, match="--export-args for --export hf: unrecognized"):
        parse_args(["h", experiment, "--export", "hf", "--export-args=--merged"])
    args, _ = parse_args(["h", experiment, "--export", "hf", "--export-args=--merge --dtype fp16"])
    assert args.export_args == ["--merge", "--dtype", "fp16"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "moved-aside"])
def test_a_staged_directory_replaces_an_older_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    from src.export import staging

    if not exchange:
        monkeypatch.setattr(staging, "_exchange", lambda first, second: False)
    target, staged = tmp_path / "export_hf", tmp_path / ".export_hf.1.tmp"
    (target / "merged").mkdir(parents=True)
    (target / "merged" / "old.safetensors").write_text("old")
    (staged / "adapter").mkdir(parents=True)
    (staged / "adapter" / "adapter_config.json").write_text("{}")
    staging.commit(staged, target)
    assert staging.tree_files(target).keys() == {"adapter/adapter_config.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export_hf"]  # the old one is gone
