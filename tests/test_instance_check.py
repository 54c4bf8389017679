"""scripts/check_instance.py: each measurement on the CPU with tiny sizes, the verdicts from
injected figures (throttled GPU, narrow PCIe link, full disk, slow bucket, unknown GPU), the
--json schema and exit codes, and `make gpu-check` refusing a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.checkpoints import read_checkpoint_infos
from src.common.paths import REPO_ROOT
from src.runs.layout import RunLayout
from src.telemetry.gpu_peaks import pcie_link_for, peak_for
from src.telemetry.instance_check import (
    EXIT_BELOW_EFFICIENCY,
    Report,
    disk_verdict,
    gpu_claim_lines,
    gpu_verdicts,
    overall_line,
    print_report,
    run_checks,
    run_disk_need,
    s3_verdict,
)
from src.telemetry.probes import (
    CheckSizes,
    disk_need_bytes,
    disk_write_mbs,
    host_transfer_gbs,
    matmul_tflops,
    measure_gpu,
    memory_bandwidth_gbs,
    nccl_allreduce_busbw_gbs,
    s3_transfer_mbs,
)
from src.utils.checkpoint_manager import CheckpointManager
from tests.support.fake_vast_server import API_KEY as VAST_KEY
from tests.support.fake_vast_server import running_fake_vast
from tests.support.moto_server import AWS_ENV, running_moto_s3

CPU = torch.device("cpu")
TINY = CheckSizes(matmul_n=32, matmul_repeats=2, copy_mb=1, host_mb=1, disk_mb=2, s3_mb=2)


def healthy_h100(**changes: object) -> dict[str, object]:
    figures: dict[str, object] = {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "bf16_tflops": 760.0,
        "tf32_tflops": 380.0,
        "memory_gbs": 2900.0,
        "h2d_gbs": 50.0,
        "pcie_max_gen": 5,
        "pcie_max_width": 16,
        "power_limit_w": 700.0,
        "power_default_w": 700.0,
        "throttle_reasons": [],
    }
    figures.update(changes)
    return figures


def lows(verdicts: list) -> list[str]:
    return [v.item for v in verdicts if not v.ok]


def test_measurements_run_on_the_cpu_with_tiny_sizes(tmp_path: Path) -> None:
    assert matmul_tflops(CPU, torch.float32, n=32, repeats=2) > 0
    assert matmul_tflops(CPU, torch.bfloat16, n=32, repeats=2) > 0
    assert memory_bandwidth_gbs(CPU, megabytes=1, repeats=2) > 0
    up, down = host_transfer_gbs(CPU, megabytes=1, repeats=2)
    assert up > 0 and down > 0
    assert disk_write_mbs(tmp_path, megabytes=2) > 0
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_s3_transfer_against_a_real_s3_server_leaves_nothing(tmp_path: Path) -> None:
    with running_moto_s3() as s3:
        client = s3.client()
        client.create_bucket(Bucket="probe-bucket")
        up, down = s3_transfer_mbs(client, "probe-bucket", "check/x.bin", tmp_path, megabytes=2)
        assert up > 0 and down > 0
        assert client.list_objects_v2(Bucket="probe-bucket").get("KeyCount", 0) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_healthy_gpu_is_ok_on_every_line() -> None:
    verdicts = gpu_verdicts(healthy_h100())
    assert verdicts and lows(verdicts) == []
    assert any("77% of the 990 peak" in v.line for v in verdicts)


def test_a_throttled_power_capped_gpu_is_low() -> None:
    figures = healthy_h100(
        bf16_tflops=420.0, power_limit_w=450.0, throttle_reasons=["power cap", "thermal (hardware)"]
    )
    assert set(lows(gpu_verdicts(figures))) == {
        "GPU 0 (NVIDIA H100 80GB HBM3) bf16",
        "GPU 0 (NVIDIA H100 80GB HBM3) power",
        "GPU 0 (NVIDIA H100 80GB HBM3) clocks",
    }
    assert "42% of an NVIDIA H100 80GB HBM3's bf16 peak" in overall_line(Report(gpus=[figures]))


def test_a_pcie_x4_riser_is_found_from_the_measured_rate() -> None:
    assert pcie_link_for(6.3) == (4, 4)
    assert pcie_link_for(25.0) == (4, 16)
    assert pcie_link_for(50.0) == (5, 16)
    figures = healthy_h100(h2d_gbs=6.3, pcie_max_gen=4, pcie_max_width=16)
    pcie = next(v for v in gpu_verdicts(figures) if v.item.endswith("PCIe"))
    assert not pcie.ok and "PCIe 4.0 x4" in pcie.line and "PCIe 4.0 x16" in pcie.line
    assert "(PCIe 4.0 x4 measured)" in overall_line(Report(gpus=[figures]))


def test_an_unknown_gpu_is_measured_and_says_no_peak_is_known() -> None:
    figures = healthy_h100(name="Imaginary GPU 9000", bf16_tflops=123.0)
    assert peak_for("Imaginary GPU 9000") is None
    verdicts = gpu_verdicts(figures)
    assert "no known peak" in verdicts[0].line and lows(verdicts) == []
    assert "123 TFLOP/s bf16, no known peak" in overall_line(Report(gpus=[figures]))


def test_the_advertised_gpu_is_compared_with_the_one_found() -> None:
    gpu = healthy_h100(name="NVIDIA GeForce RTX 4090")
    offer = {"gpu_name": "RTX 4090", "num_gpus": 2.0}
    assert gpu_claim_lines(Report(gpus=[gpu, {**gpu, "index": 1}], offer=offer)) == [
        "  ok   offer gpu: advertised RTX 4090 x 2, found NVIDIA GeForce RTX 4090 x 2"
    ]
    short = gpu_claim_lines(Report(gpus=[gpu], offer=offer))[0]
    assert short.startswith("  LOW") and "found NVIDIA GeForce RTX 4090 x 1" in short
    other = gpu_claim_lines(Report(gpus=[gpu], offer={"gpu_name": "RTX 3090"}))[0]
    assert other.startswith("  LOW")


def test_known_peaks_match_specific_names_first() -> None:
    assert peak_for("NVIDIA H100 PCIe").bf16_tflops == 756.5
    assert peak_for("NVIDIA H100 80GB HBM3").bf16_tflops == 989.5
    assert peak_for("NVIDIA GeForce RTX 4090").memory_gbs == 1008.0
    assert peak_for("NVIDIA A100-SXM4-80GB").memory_gbs == 2039.0


def test_a_full_disk_and_a_slow_disk_are_low() -> None:
    need = disk_need_bytes(checkpoint_bytes=13_000_000, keep_last_n=3, weights_bytes=4_000_000)
    assert need == 13_000_000 * 5 + 8_000_000
    verdicts = disk_verdict(
        {"path": "/workspace", "free_bytes": 30_000_000, "need_bytes": need, "write_mbs": 40.0}
    )
    assert lows(verdicts) == ["disk space", "disk write"]
    assert "30 MB free at /workspace, the run needs ~73 MB" in verdicts[0].line


def test_a_slow_or_broken_bucket_is_low() -> None:
    slow = s3_verdict({"bucket": "b", "upload_mbs": 12.0, "download_mbs": 300.0})
    assert lows(slow) == ["S3"] and "expected >= 50" in slow[0].line
    broken = s3_verdict({"bucket": "b", "error": "AccessDenied"})
    assert lows(broken) == ["S3"]
    assert s3_verdict({}) == []


def test_below_the_efficiency_floor_exits_3(capsys: pytest.CaptureFixture) -> None:
    report = Report(gpus=[healthy_h100(bf16_tflops=500.0)])
    assert print_report(report, min_gpu_efficiency=0.8) == EXIT_BELOW_EFFICIENCY
    assert "below --min-gpu-efficiency 0.80" in capsys.readouterr().out
    assert print_report(report, min_gpu_efficiency=0.5) == 0


def test_run_checks_without_a_gpu_measures_disk_and_s3(tmp_path: Path) -> None:
    with running_moto_s3() as s3:
        client = s3.client()
        client.create_bucket(Bucket="probe-bucket")
        report = run_checks(
            tmp_path, TINY, s3_client=client, s3_bucket="probe-bucket", say=lambda _: None
        )
    if not torch.cuda.is_available():
        assert report.gpus == [] and "no NVIDIA GPU" in report.notes[0]
    assert report.disk["write_mbs"] > 0 and report.disk["free_bytes"] > 0
    assert report.s3["upload_mbs"] > 0 and "error" not in report.s3


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/check_instance.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path, on a machine without one")
def test_json_on_a_cpu_machine_and_its_exit_codes(tmp_path: Path) -> None:
    with running_moto_s3() as s3:
        s3.client().create_bucket(Bucket="probe-bucket")
        done = run_script(
            "--quick",
            "--json",
            str(tmp_path / "report.json"),
            "--output-dir",
            str(tmp_path / "out"),
            "--s3-bucket",
            "probe-bucket",
            "--s3-endpoint-url",
            s3.endpoint_url,
            "--min-gpu-efficiency",
            "0.9",
            env=AWS_ENV,
        )
    assert done.returncode == 0, done.stderr
    assert "no GPU here: measured the disk and S3" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {"gpus", "disk", "s3", "versions", "notes", "exit_code"}
    assert report["gpus"] == [] and report["exit_code"] == 0
    assert report["disk"]["write_mbs"] > 0 and report["s3"]["upload_mbs"] > 0
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr


def test_a_bad_efficiency_floor_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run_script("--min-gpu-efficiency", "1.5", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 2
    assert "--min-gpu-efficiency must be in (0, 1], got 1.5" in done.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path, on a machine without one")
def test_make_gpu_check_refuses_a_machine_without_a_gpu() -> None:
    done = subprocess.run(
        ["make", "-s", "gpu-check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "no NVIDIA GPU here" in done.stdout
    assert "installing" not in done.stdout  # said so before doing anything


@pytest.mark.gpu
def test_measure_gpu_reads_plausible_figures_on_a_real_gpu() -> None:
    figures = measure_gpu(0, CheckSizes.quick())
    assert figures["bf16_tflops"] > 1 and figures["memory_gbs"] > 50 and figures["h2d_gbs"] > 1
    assert figures["name"] == torch.cuda.get_device_name(0)


def test_on_a_vast_instance_the_offer_claims_stand_beside_the_figures(tmp_path: Path) -> None:
    """Through the provider seam: the instance's own claims (fake Vast.ai API) are printed
    beside what was measured, and written to --json."""
    with running_fake_vast() as vast:
        vast.instances[101]["disk_bw"] = 1e9  # a host that oversells its disk
        done = run_script(
            "--quick",
            "--output-dir",
            str(tmp_path / "out"),
            "--json",
            str(tmp_path / "report.json"),
            env={"CONTAINER_ID": "101", "VASTAI_API_KEY": VAST_KEY, "VAST_URL": vast.url},
        )
    assert done.returncode == 0, done.stderr
    assert "LOW  offer disk_bw: claims 1000000000.0 MB/s disk write, measured " in done.stdout
    assert "offer dlperf: claims 61.2 DLPerf (not measured)" in done.stdout
    if not torch.cuda.is_available():  # advertised 2 x RTX 4090, found none
        assert "LOW  offer gpu: advertised RTX 4090 x 2, but no GPU is visible here" in done.stdout
    assert json.loads((tmp_path / "report.json").read_text())["offer"]["pcie_bw"] == 24.6
    assert VAST_KEY not in done.stdout + done.stderr


def test_run_dir_sizes_the_disk_from_the_runs_newest_checkpoint(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "runs" / "sized")
    layout.root.mkdir(parents=True)
    layout.config.write_text(json.dumps({"checkpoint": {"keep_last_n": 3}}))
    manager = CheckpointManager(layout.checkpoints, keep_last_n=3, async_save=False)
    manager.save({"weights": torch.zeros(50_000)}, step=10)
    torch.save({"weights": torch.zeros(10_000)}, layout.best_model)
    checkpoint = read_checkpoint_infos(layout.checkpoints)[0].size
    expected = checkpoint * 5 + 2 * layout.best_model.stat().st_size
    assert run_disk_need(layout) == expected
    done = run_script("--quick", "--run-dir", str(layout.root), "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["disk"]["need_bytes"] == expected
    assert f"at {layout.root.parent}, the run needs ~" in done.stdout
    bad = run_script("--run-dir", str(tmp_path))
    assert bad.returncode == 2 and "has no config.json: pass a run directory" in bad.stderr


@pytest.mark.gpu
def test_nccl_all_reduce_across_the_local_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(
            f"needs 2 GPUs for an all-reduce (this machine has {torch.cuda.device_count()})"
        )
    assert nccl_allreduce_busbw_gbs(torch.cuda.device_count(), megabytes=64) > 1


def test_gpu_check_counts_uncollected_modules_without_gpu_tests_as_ok() -> None:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from gpu_check import pytest_result
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    missing = "ERROR collecting tests/test_notebook_cells.py\n13 passed, 1 error in 184.65s\n"
    assert pytest_result(missing).startswith("ok (1 module(s) without GPU tests not collected")
    assert pytest_result("ERROR collecting x\n1 failed, 12 passed, 1 error in 9s\n") == "exit 1"
    assert pytest_result("1 failed, 12 passed in 9s\n") == "exit 1"
