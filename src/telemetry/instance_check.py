"""Measure the machine you rented against what its GPU and its offer promise.

Each measurement is a small function that runs on any torch device (the CPU too, with tiny
sizes, which is how the tests pin them); ``run_checks`` strings them together under a time
budget, and ``verdicts`` turns figures into one ``ok`` / ``low`` line per item. Peaks are
the vendors' dense (no sparsity) figures; an unknown GPU is measured anyway and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from src.common.paths import resolve_output_dir
from src.storage.s3 import make_client
from src.telemetry.nvml import NvmlUnavailable, nvml_session, visible_handles

MB = 1_000_000
GB = 1_000_000_000


@dataclass(frozen=True)
class GpuPeak:
    """A GPU's dense tensor-core peaks (TFLOP/s) and memory bandwidth (GB/s)."""

    bf16_tflops: float
    tf32_tflops: float
    memory_gbs: float
    source: str


# Dense figures (the sheets print "with sparsity" as twice these). Matched on the NVML/torch
# name, most specific first. GeForce and RTX cards: bf16 with fp32 accumulation, as torch uses.
KNOWN_PEAKS: tuple[tuple[str, GpuPeak], ...] = (
    ("H200 NVL", GpuPeak(835.0, 417.5, 4800.0, "NVIDIA H200 Tensor Core GPU datasheet (NVL)")),
    ("H200", GpuPeak(989.5, 494.7, 4800.0, "NVIDIA H200 Tensor Core GPU datasheet (SXM)")),
    ("H100 NVL", GpuPeak(835.0, 417.5, 3900.0, "NVIDIA H100 Tensor Core GPU datasheet (NVL)")),
    ("H100 PCIe", GpuPeak(756.5, 378.0, 2000.0, "NVIDIA H100 Tensor Core GPU datasheet (PCIe)")),
    ("H100", GpuPeak(989.5, 494.7, 3350.0, "NVIDIA H100 Tensor Core GPU datasheet (SXM)")),
    ("A100-SXM4-80GB", GpuPeak(312.0, 156.0, 2039.0, "NVIDIA A100 datasheet (80GB SXM)")),
    ("A100 80GB PCIe", GpuPeak(312.0, 156.0, 1935.0, "NVIDIA A100 datasheet (80GB PCIe)")),
    ("A100", GpuPeak(312.0, 156.0, 1555.0, "NVIDIA A100 datasheet (40GB)")),
    ("L40S", GpuPeak(362.05, 183.0, 864.0, "NVIDIA L40S datasheet")),
    ("RTX 6000 Ada", GpuPeak(364.2, 182.1, 960.0, "NVIDIA RTX 6000 Ada datasheet")),
    ("RTX A6000", GpuPeak(154.8, 77.4, 768.0, "NVIDIA RTX A6000 datasheet")),
    ("RTX 5090", GpuPeak(209.5, 104.8, 1792.0, "NVIDIA RTX Blackwell GPU architecture, app. A")),
    ("RTX 4090", GpuPeak(165.2, 82.6, 1008.0, "NVIDIA Ada GPU architecture whitepaper, app. A")),
    ("RTX 3090", GpuPeak(71.0, 35.6, 936.0, "NVIDIA Ampere GA102 GPU architecture, app. A")),
    ("A10", GpuPeak(125.0, 62.5, 600.0, "NVIDIA A10 datasheet")),
    ("L4", GpuPeak(121.0, 60.0, 300.0, "NVIDIA L4 datasheet")),
)

# PCIe per-direction payload rate of one lane, GB/s, after line coding (gen 3+: 128b/130b).
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
PCIE_EFFICIENCY = 0.80  # what a pinned cudaMemcpy reaches of the link's payload rate, typically


def peak_for(name: str) -> GpuPeak | None:
    """The table's entry for a GPU name such as ``NVIDIA H200`` (None when unknown)."""
    for key, peak in KNOWN_PEAKS:
        if key.lower() in name.lower():
            return peak
    return None


def pcie_link_for(gbs: float) -> tuple[int, int]:
    """The (generation, width) whose typical pinned copy rate is nearest ``gbs``."""
    candidates = [(gen, width) for gen in (3, 4, 5) for width in (16, 8, 4, 1)]

    def distance(link: tuple[int, int]) -> float:
        typical = PCIE_LANE_GBS[link[0]] * link[1] * PCIE_EFFICIENCY
        return abs(typical - gbs) / typical

    return min(candidates, key=distance)


# ----- measurements (any device; CPU with tiny sizes in the tests) -----


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """Seconds per call of ``work`` over ``repeats`` calls, after one warm-up call."""

    def timed(work: Callable[[], Any], repeats: int) -> float:
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                work()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / repeats
        began = time.perf_counter()
        for _ in range(repeats):
            work()
        return (time.perf_counter() - began) / repeats

    return timed


def matmul_tflops(
    device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20
) -> float:
    """Dense ``n x n @ n x n`` TFLOP/s in ``dtype`` (float32 means TF32 on tensor cores)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _timer(device)(lambda: a @ b, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / seconds / 1e12


def memory_bandwidth_gbs(device: torch.device, megabytes: int = 1024, repeats: int = 20) -> float:
    """Device memory bandwidth of a copy, GB/s, counting bytes read and written."""
    source = torch.empty(megabytes * MB, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = _timer(device)(lambda: target.copy_(source), repeats)
    return 2 * source.numel() / seconds / GB


def host_transfer_gbs(
    device: torch.device, megabytes: int = 256, repeats: int = 10
) -> tuple[float, float]:
    """(host to device, device to host) GB/s through pinned host memory."""
    pinned = device.type == "cuda"
    host = torch.empty(megabytes * MB, dtype=torch.uint8, pin_memory=pinned)
    on_device = torch.empty(megabytes * MB, dtype=torch.uint8, device=device)
    timed = _timer(device)
    up = timed(lambda: on_device.copy_(host, non_blocking=pinned), repeats)
    down = timed(lambda: host.copy_(on_device, non_blocking=pinned), repeats)
    return host.numel() / up / GB, host.numel() / down / GB


def disk_write_mbs(directory: Path, megabytes: int = 512) -> float:
    """Sequential write MB/s of one file, fsync included (what a checkpoint pays); removed."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".check_instance_{os.getpid()}.tmp"
    chunk = os.urandom(8 * MB)
    try:
        began = time.perf_counter()
        with open(path, "wb") as handle:
            written = 0
            while written < megabytes * MB:
                handle.write(chunk[: min(len(chunk), megabytes * MB - written)])
                written += min(len(chunk), megabytes * MB - written)
            handle.flush()
            os.fsync(handle.fileno())
        return written / (time.perf_counter() - began) / MB
    finally:
        path.unlink(missing_ok=True)


def s3_transfer_mbs(
    client: Any, bucket: str, key: str, directory: Path, megabytes: int = 256
) -> tuple[float, float]:
    """(upload, download) MB/s of one object through boto3's transfer manager; then deleted."""
    source = directory / f".check_instance_s3_{os.getpid()}.bin"
    back = source.with_suffix(".back")
    with open(source, "wb") as handle:
        for _ in range(megabytes):
            handle.write(os.urandom(MB))
    try:
        began = time.perf_counter()
        client.upload_file(str(source), bucket, key)
        up = megabytes / (time.perf_counter() - began)
        began = time.perf_counter()
        client.download_file(bucket, key, str(back))
        down = megabytes / (time.perf_counter() - began)
        return up, down
    finally:
        client.delete_object(Bucket=bucket, Key=key)
        source.unlink(missing_ok=True)
        back.unlink(missing_ok=True)


def _allreduce_worker(rank: int, world: int, port: int, megabytes: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    try:
        tensor = torch.ones(megabytes * MB // 4, device=f"cuda:{rank}")
        for _ in range(3):
            torch.distributed.all_reduce(tensor)
        torch.cuda.synchronize()
        repeats = 10
        began = time.perf_counter()
        for _ in range(repeats):
            torch.distributed.all_reduce(tensor)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - began) / repeats
        if rank == 0:  # nccl-tests' bus bandwidth: comparable across GPU counts
            results.put(tensor.numel() * 4 * 2 * (world - 1) / world / seconds / GB)
    finally:
        torch.distributed.destroy_process_group()


def nccl_allreduce_busbw_gbs(world: int, megabytes: int = 256) -> float:
    """NCCL all-reduce bus bandwidth across ``world`` local GPUs, in spawned processes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(
        _allreduce_worker,
        args=(world, port, megabytes, results),
        nprocs=world,
        start_method="spawn",
    )
    return float(results.get())


# ----- what the machine says about itself -----


def nvml_facts(index: int) -> dict[str, Any]:
    """Driver, power limits, throttle reasons, ECC and PCIe link of GPU ``index`` (NVML)."""
    try:
        with nvml_session() as nvml:
            handle = dict(visible_handles(nvml))[index]

            def read(call: Callable[[], Any]) -> Any:
                try:
                    return call()
                except Exception:  # NotSupported on some cards, or in a VM
                    return None

            reasons = read(lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
            if reasons is None:
                reasons = read(lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
            driver = read(nvml.nvmlSystemGetDriverVersion)
            return {
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "power_limit_w": _milli(read(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))),
                "power_default_w": _milli(
                    read(lambda: nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle))
                ),
                "throttle_reasons": throttle_names(reasons or 0, nvml),
                "ecc_uncorrected": read(
                    lambda: nvml.nvmlDeviceGetTotalEccErrors(
                        handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
                    )
                ),
                "pcie_gen": read(lambda: nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
                "pcie_width": read(lambda: nvml.nvmlDeviceGetCurrPcieLinkWidth(handle)),
                "pcie_max_gen": read(lambda: nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
                "pcie_max_width": read(lambda: nvml.nvmlDeviceGetMaxPcieLinkWidth(handle)),
            }
    except (NvmlUnavailable, KeyError) as error:
        return {"nvml": f"unavailable ({error})"}


def _milli(value: int | None) -> float | None:
    return None if value is None else value / 1000.0


# The reasons that mean "slower than it should be"; idle and app-clock settings are not.
BAD_THROTTLES = {
    "nvmlClocksThrottleReasonSwPowerCap": "power cap",
    "nvmlClocksThrottleReasonHwSlowdown": "hardware slowdown",
    "nvmlClocksThrottleReasonSwThermalSlowdown": "thermal (software)",
    "nvmlClocksThrottleReasonHwThermalSlowdown": "thermal (hardware)",
    "nvmlClocksThrottleReasonHwPowerBrakeSlowdown": "power brake",
}


def throttle_names(mask: int, nvml: Any) -> list[str]:
    """The bad throttle reasons set in an NVML reason bitmask, as words."""
    return [
        words for attr, words in BAD_THROTTLES.items() if mask & int(getattr(nvml, attr, 0) or 0)
    ]


def cuda_build_note() -> str | None:
    """Why torch's CUDA build cannot run here, or None when it can (or there is no CUDA)."""
    if torch.version.cuda is None:
        return None
    try:
        torch.zeros(1, device="cuda")
        return None
    except Exception as error:  # e.g. "The NVIDIA driver on your system is too old"
        return str(error).splitlines()[0]


# ----- the verdicts -----


@dataclass
class Verdict:
    item: str
    ok: bool
    line: str

    def render(self) -> str:
        return f"  {'ok ' if self.ok else 'LOW'}  {self.item}: {self.line}"


@dataclass
class Report:
    """Every figure measured, keyed the way ``--json`` writes them."""

    gpus: list[dict[str, Any]] = field(default_factory=list)
    nccl_busbw_gbs: float | None = None
    disk: dict[str, Any] = field(default_factory=dict)
    s3: dict[str, Any] = field(default_factory=dict)
    offer: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


LOW_FRACTION = 0.7  # below 70% of the reference: a throttled card, a narrow link, a slow disk


def gpu_efficiency(gpu: Mapping[str, Any]) -> float | None:
    """Measured bf16 over the known peak (None for an unknown GPU)."""
    peak = peak_for(gpu["name"])
    if peak is None or gpu.get("bf16_tflops") is None:
        return None
    return gpu["bf16_tflops"] / peak.bf16_tflops


def gpu_verdicts(gpu: Mapping[str, Any]) -> list[Verdict]:
    """bf16, tf32, memory bandwidth, PCIe, power and throttling of one GPU's figures."""
    label = f"GPU {gpu['index']} ({gpu['name']})"
    peak = peak_for(gpu["name"])
    out: list[Verdict] = []
    if peak is None:
        out.append(Verdict(label, True, "no known peak for this GPU: figures measured, not judged"))
    else:
        for key, ref, unit in (
            ("bf16_tflops", peak.bf16_tflops, "TFLOP/s bf16"),
            ("tf32_tflops", peak.tf32_tflops, "TFLOP/s tf32"),
            ("memory_gbs", peak.memory_gbs, "GB/s memory"),
        ):
            if gpu.get(key) is not None:
                share = gpu[key] / ref
                out.append(
                    Verdict(
                        f"{label} {unit.split()[-1]}",
                        share >= LOW_FRACTION,
                        f"{gpu[key]:.0f} {unit} = {share:.0%} of the {ref:.0f} peak",
                    )
                )
    if gpu.get("h2d_gbs") is not None:
        gen, width = pcie_link_for(gpu["h2d_gbs"])
        expected = gpu.get("pcie_max_gen"), gpu.get("pcie_max_width")
        line = f"{gpu['h2d_gbs']:.1f} GB/s host->device (~PCIe {gen}.0 x{width})"
        ok = True
        if all(expected):
            link_gbs = PCIE_LANE_GBS.get(expected[0], 0) * expected[1] * PCIE_EFFICIENCY
            ok = gpu["h2d_gbs"] >= LOW_FRACTION * link_gbs
            line += f"; the card's link is PCIe {expected[0]}.0 x{expected[1]} (~{link_gbs:.0f})"
        out.append(Verdict(f"{label} PCIe", ok, line))
    limit, default = gpu.get("power_limit_w"), gpu.get("power_default_w")
    if limit and default:
        ok = limit >= 0.9 * default
        out.append(Verdict(f"{label} power", ok, f"limit {limit:.0f} W of {default:.0f} W"))
    if gpu.get("throttle_reasons"):
        out.append(
            Verdict(f"{label} clocks", False, "throttled: " + ", ".join(gpu["throttle_reasons"]))
        )
    if gpu.get("ecc_uncorrected"):
        out.append(Verdict(f"{label} ECC", False, f"{gpu['ecc_uncorrected']} uncorrected errors"))
    if gpu.get("cuda_build_note"):
        out.append(Verdict(f"{label} CUDA", False, gpu["cuda_build_note"]))
    return out


def human_size(num_bytes: float) -> str:
    """``30 MB`` / ``1.2 GB`` (decimal units, as disks are sold)."""
    return f"{num_bytes / GB:.1f} GB" if num_bytes >= GB else f"{num_bytes / MB:.0f} MB"


def disk_verdict(disk: Mapping[str, Any], min_write_mbs: float = 200.0) -> list[Verdict]:
    """Free space against the run's need, and write speed with fsync."""
    out = []
    need = disk.get("need_bytes")
    if need:
        out.append(
            Verdict(
                "disk space",
                disk["free_bytes"] >= need,
                f"{human_size(disk['free_bytes'])} free at {disk['path']}, "
                f"the run needs ~{human_size(need)}",
            )
        )
    else:
        free = human_size(disk["free_bytes"])
        out.append(Verdict("disk space", True, f"{free} free at {disk['path']}"))
    if disk.get("write_mbs") is not None:
        ok = disk["write_mbs"] >= min_write_mbs
        out.append(
            Verdict(
                "disk write",
                ok,
                f"{disk['write_mbs']:.0f} MB/s with fsync"
                + ("" if ok else f" (expected >= {min_write_mbs:.0f})"),
            )
        )
    return out


def s3_verdict(s3: Mapping[str, Any], min_mbs: float = 50.0) -> list[Verdict]:
    """Upload and download rates of the configured bucket."""
    if not s3:
        return []
    if s3.get("error"):
        return [Verdict("S3", False, s3["error"])]
    ok = min(s3["upload_mbs"], s3["download_mbs"]) >= min_mbs
    line = f"up {s3['upload_mbs']:.0f} MB/s, down {s3['download_mbs']:.0f} MB/s ({s3['bucket']})"
    return [Verdict("S3", ok, line + ("" if ok else f" (expected >= {min_mbs:.0f})"))]


def offer_lines(report: Report) -> list[str]:
    """The offer's own claims beside what was measured (Vast.ai field names)."""
    offer = report.offer
    if not offer:
        return []
    gpu = report.gpus[0] if report.gpus else {}
    pairs = [
        ("pcie_bw", "GB/s host<->GPU", gpu.get("h2d_gbs")),
        ("disk_bw", "MB/s disk", report.disk.get("write_mbs")),
        ("inet_down", "Mb/s down", None),
        ("inet_up", "Mb/s up", None),
        ("dlperf", "DLPerf", None),
    ]
    lines = []
    for key, unit, measured in pairs:
        if offer.get(key) is None:
            continue
        tail = f", measured {measured:.1f}" if measured is not None else ""
        lines.append(f"  offer  {key}: claims {float(offer[key]):.1f} {unit}{tail}")
    return lines


def verdicts(report: Report) -> list[Verdict]:
    out: list[Verdict] = []
    for gpu in report.gpus:
        out += gpu_verdicts(gpu)
    if report.nccl_busbw_gbs is not None:
        out.append(
            Verdict("NCCL", True, f"all-reduce bus bandwidth {report.nccl_busbw_gbs:.0f} GB/s")
        )
    if report.disk:
        out += disk_verdict(report.disk)
    out += s3_verdict(report.s3)
    return out


def overall_line(report: Report) -> str:
    """One sentence: the weakest GPU's share of its peak, with the link measured."""
    if not report.gpus:
        return "no GPU here: measured the disk" + (" and S3" if report.s3 else "")
    parts = []
    for gpu in report.gpus:
        share = gpu_efficiency(gpu)
        link = ""
        if gpu.get("h2d_gbs") is not None:
            gen, width = pcie_link_for(gpu["h2d_gbs"])
            link = f" (PCIe {gen}.0 x{width} measured)"
        if share is None:
            tflops = gpu.get("bf16_tflops") or 0.0
            parts.append(
                f"GPU {gpu['index']} ({gpu['name']}): {tflops:.0f} TFLOP/s bf16, "
                f"no known peak{link}"
            )
        else:
            parts.append(
                f"GPU {gpu['index']} delivers {share:.0%} of an {gpu['name']}'s bf16 peak{link}"
            )
    return "; ".join(parts)


# ----- the whole check -----


@dataclass(frozen=True)
class CheckSizes:
    """How much each measurement does; ``quick`` is about a quarter of the default."""

    matmul_n: int = 8192
    matmul_repeats: int = 30
    copy_mb: int = 1024
    host_mb: int = 256
    disk_mb: int = 1024
    s3_mb: int = 256
    nccl_mb: int = 256

    @classmethod
    def quick(cls) -> CheckSizes:
        return cls(
            matmul_n=4096,
            matmul_repeats=20,
            copy_mb=256,
            host_mb=64,
            disk_mb=256,
            s3_mb=64,
            nccl_mb=64,
        )


def measure_gpu(index: int, sizes: CheckSizes) -> dict[str, Any]:
    """Every per-GPU figure of CUDA device ``index``."""
    device = torch.device("cuda", index)
    props = torch.cuda.get_device_properties(index)
    figures: dict[str, Any] = {
        "index": index,
        "name": props.name,
        "memory_gb": props.total_memory / GB,
        "capability": f"{props.major}.{props.minor}",
    }
    figures.update(nvml_facts(index))
    with torch.cuda.device(index):
        figures["bf16_tflops"] = matmul_tflops(
            device, torch.bfloat16, sizes.matmul_n, sizes.matmul_repeats
        )
        figures["tf32_tflops"] = matmul_tflops(
            device, torch.float32, sizes.matmul_n, sizes.matmul_repeats // 2
        )
        figures["memory_gbs"] = memory_bandwidth_gbs(device, sizes.copy_mb)
        figures["h2d_gbs"], figures["d2h_gbs"] = host_transfer_gbs(device, sizes.host_mb)
    torch.cuda.empty_cache()
    peak = peak_for(props.name)
    figures["peak"] = asdict(peak) if peak else None
    return figures


def disk_need_bytes(checkpoint_bytes: int, keep_last_n: int, weights_bytes: int = 0) -> int:
    """Space a run needs on its volume: ``keep_last_n`` + 2 checkpoints (one being written,
    one being retired) plus the best and final weights."""
    return checkpoint_bytes * (keep_last_n + 2) + 2 * weights_bytes


def measure_disk(path: Path, sizes: CheckSizes, need_bytes: int | None) -> dict[str, Any]:
    path.mkdir(parents=True, exist_ok=True)
    return {
        "path": str(path),
        "free_bytes": shutil.disk_usage(path).free,
        "need_bytes": need_bytes,
        "write_mbs": disk_write_mbs(path, sizes.disk_mb),
    }


def versions() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }


def run_checks(
    output_dir: Path,
    sizes: CheckSizes,
    *,
    need_bytes: int | None = None,
    s3_client: Any = None,
    s3_bucket: str | None = None,
    offer: Mapping[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> Report:
    """Measure everything this machine has; each step says what it is doing."""
    report = Report(versions=versions(), offer=dict(offer or {}))
    note = cuda_build_note()
    if torch.cuda.is_available() and note is None:
        for index in range(torch.cuda.device_count()):
            say(f"[check] GPU {index}: matmul, memory and PCIe ...")
            report.gpus.append(measure_gpu(index, sizes))
        if torch.cuda.device_count() > 1:
            say(f"[check] NCCL all-reduce across {torch.cuda.device_count()} GPUs ...")
            report.nccl_busbw_gbs = nccl_allreduce_busbw_gbs(
                torch.cuda.device_count(), sizes.nccl_mb
            )
    elif note is not None:
        report.notes.append(f"torch's CUDA build cannot run here: {note}")
    else:
        report.notes.append("no NVIDIA GPU visible to torch: measured the disk and S3 only")
    say(f"[check] disk at {output_dir} ...")
    report.disk = measure_disk(output_dir, sizes, need_bytes)
    if s3_bucket:
        say(f"[check] S3 bucket {s3_bucket} ...")
        key = f"check_instance/{socket.gethostname()}-{os.getpid()}.bin"
        try:
            up, down = s3_transfer_mbs(s3_client, s3_bucket, key, output_dir, sizes.s3_mb)
            report.s3 = {"bucket": s3_bucket, "upload_mbs": up, "download_mbs": down}
        except Exception as error:  # a check reports a broken bucket, it does not crash
            report.s3 = {"bucket": s3_bucket, "error": str(error).splitlines()[0]}
    return report


EXIT_BELOW_EFFICIENCY = 3


def print_report(report: Report, min_gpu_efficiency: float | None = None) -> int:
    """The verdict lines, the offer's claims and the overall line; the exit code."""
    for note in report.notes:
        print(f"[check] {note}")
    for verdict in verdicts(report):
        print(verdict.render())
    for line in offer_lines(report):
        print(line)
    print(f"[check] {overall_line(report)}")
    if min_gpu_efficiency is None or not report.gpus:
        return 0
    worst = min(
        (gpu_efficiency(g) for g in report.gpus if gpu_efficiency(g) is not None), default=None
    )
    if worst is not None and worst < min_gpu_efficiency:
        print(
            f"[check] below --min-gpu-efficiency {min_gpu_efficiency:.2f}: "
            f"the weakest GPU delivers {worst:.2f} of its bf16 peak"
        )
        return EXIT_BELOW_EFFICIENCY
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure this machine's GPUs, PCIe, NCCL, disk and S3 against their promises."
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 15 s)")
    parser.add_argument(
        "--min-gpu-efficiency", type=float, help="exit 3 when a GPU delivers less of its bf16 peak"
    )
    parser.add_argument("--output-dir", type=Path, help="volume to check (default: the runs' own)")
    parser.add_argument(
        "--s3-bucket", help="also measure this bucket (AWS credentials from the env)"
    )
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (R2, MinIO, ...)")
    args = parser.parse_args(argv)
    if args.min_gpu_efficiency is not None and not 0 < args.min_gpu_efficiency <= 1:
        parser.error(f"--min-gpu-efficiency must be in (0, 1], got {args.min_gpu_efficiency}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = CheckSizes.quick() if args.quick else CheckSizes()
    client = None
    if args.s3_bucket:
        client = make_client(args.s3_endpoint_url)
    output_dir = args.output_dir or resolve_output_dir()
    report = run_checks(output_dir, sizes, s3_client=client, s3_bucket=args.s3_bucket)
    code = print_report(report, args.min_gpu_efficiency)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**report.as_dict(), "exit_code": code}, indent=2) + "\n")
        print(f"[check] figures written to {args.json}")
    sys.stdout.flush()
    return code
