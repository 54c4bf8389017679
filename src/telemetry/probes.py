"""Timed probes of this machine: matmul, device memory, host<->device copies, NCCL, disk, S3.

Each runs on any torch device (the CPU too, with tiny sizes, which is how the tests pin
them); sizes come from ``CheckSizes``. NVML adds what the driver says about each GPU.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from src.checkpoints.disk_space import disk_need_bytes as disk_need_bytes  # the trainer's estimate
from src.telemetry.gpu_peaks import GB, MB, peak_for
from src.telemetry.nvml import NvmlUnavailable, nvml_session, visible_handles


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


def measure_disk(path: Path, sizes: CheckSizes, need_bytes: int | None) -> dict[str, Any]:
    """Free space, the room a run needs (``disk_need_bytes``, the trainer's own estimate)
    and the write speed at ``path``."""
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
