"""Measure the machine you rented against what its GPU and its offer promise.

``run_checks`` runs the probes (``probes.py``) under their sizes; the verdicts turn figures
into one ``ok`` / ``LOW`` line per item against the known peaks (``gpu_peaks.py``), and
``main`` is ``scripts/check_instance.py``. An unknown GPU is measured anyway and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from src.checkpoints import read_checkpoint_infos
from src.common.errors import EXIT_BELOW_EFFICIENCY
from src.common.paths import resolve_output_dir
from src.runs.layout import RunLayout
from src.storage.s3 import make_client
from src.telemetry.gpu_peaks import GB, MB, PCIE_EFFICIENCY, PCIE_LANE_GBS, pcie_link_for, peak_for
from src.telemetry.probes import (
    CheckSizes,
    cuda_build_note,
    disk_need_bytes,
    measure_disk,
    measure_gpu,
    nccl_allreduce_busbw_gbs,
    s3_transfer_mbs,
    versions,
)


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


def same_gpu(advertised: str, found: str) -> bool:
    """``RTX 4090`` vs ``NVIDIA GeForce RTX 4090``: every word of the advertised name (after
    the vendor's) appears in the name the driver reports."""
    words = [w for w in advertised.lower().replace("-", " ").split() if w not in {"nvidia"}]
    return all(word in found.lower().replace("-", " ") for word in words)


def gpu_claim_lines(report: Report) -> list[str]:
    """The GPU type and count the offer advertised against what this machine has."""
    advertised = report.offer.get("gpu_name")
    if not advertised:
        return []
    names = [gpu["name"] for gpu in report.gpus]
    count = report.offer.get("num_gpus")
    want = f"{advertised}" + (f" x {count:g}" if isinstance(count, int | float) else "")
    if not names:
        return [f"  LOW  offer gpu: advertised {want}, but no GPU is visible here"]
    found = f"{names[0]} x {len(names)}"
    ok = all(same_gpu(str(advertised), name) for name in names) and (
        not isinstance(count, int | float) or len(names) >= count
    )
    return [f"  {'ok ' if ok else 'LOW'}  offer gpu: advertised {want}, found {found}"]


def offer_lines(report: Report) -> list[str]:
    """The offer's own claims beside what was measured (Vast.ai field names and units);
    ``LOW`` where the measurement falls under LOW_FRACTION of the claim."""
    offer = report.offer
    if not offer:
        return []
    gpu = report.gpus[0] if report.gpus else {}
    s3 = report.s3 if "error" not in report.s3 else {}
    megabits = {key: s3[key] * 8 for key in ("upload_mbs", "download_mbs") if key in s3}
    pairs = [
        ("pcie_bw", "GB/s host<->GPU", gpu.get("h2d_gbs")),
        ("disk_bw", "MB/s disk write", report.disk.get("write_mbs")),
        ("inet_down", "Mb/s down (S3 download)", megabits.get("download_mbs")),
        ("inet_up", "Mb/s up (S3 upload)", megabits.get("upload_mbs")),
        ("dlperf", "DLPerf", None),
    ]
    lines = gpu_claim_lines(report)
    for key, unit, measured in pairs:
        if offer.get(key) is None:
            continue
        claim = float(offer[key])
        if measured is None:
            lines.append(f"  --   offer {key}: claims {claim:.1f} {unit} (not measured)")
            continue
        ok = measured >= LOW_FRACTION * claim
        mark = "ok " if ok else "LOW"
        lines.append(f"  {mark}  offer {key}: claims {claim:.1f} {unit}, measured {measured:.1f}")
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


def run_disk_need(layout: RunLayout) -> int | None:
    """What the run will hold on its volume, from its newest checkpoint and its config's
    keep_last_n (None before its first checkpoint)."""
    records = read_checkpoint_infos(layout.checkpoints)
    if not records:
        return None
    keep_last_n = json.loads(layout.config.read_text())["checkpoint"]["keep_last_n"]
    weights = max(
        (path.stat().st_size for path in (layout.best_model, layout.final_model) if path.exists()),
        default=0,
    )
    return disk_need_bytes(records[0].size, int(keep_last_n), weights)


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
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="a run to size the disk for: its newest checkpoint x (keep_last_n + 2) + weights",
    )
    args = parser.parse_args(argv)
    if args.run_dir is not None and not RunLayout(args.run_dir).config.is_file():
        parser.error(f"--run-dir {args.run_dir} has no config.json: pass a run directory")
    if args.min_gpu_efficiency is not None and not 0 < args.min_gpu_efficiency <= 1:
        parser.error(f"--min-gpu-efficiency must be in (0, 1], got {args.min_gpu_efficiency}")
    return args


def main(
    argv: list[str] | None = None, offer_claims: Callable[[], Mapping[str, Any]] | None = None
) -> int:
    """``scripts/check_instance.py``; ``offer_claims`` gives the rented offer's own claims
    (the script passes the cloud provider's lookup: telemetry sits below src.cloud)."""
    args = parse_args(argv)
    sizes = CheckSizes.quick() if args.quick else CheckSizes()
    client = None
    if args.s3_bucket:
        client = make_client(args.s3_endpoint_url)
    output_dir = args.output_dir or (args.run_dir.parent if args.run_dir else resolve_output_dir())
    need = run_disk_need(RunLayout(args.run_dir)) if args.run_dir else None
    offer = offer_claims() if offer_claims is not None else {}
    report = run_checks(
        output_dir, sizes, need_bytes=need, s3_client=client, s3_bucket=args.s3_bucket, offer=offer
    )
    code = print_report(report, args.min_gpu_efficiency)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**report.as_dict(), "exit_code": code}, indent=2) + "\n")
        print(f"[check] figures written to {args.json}")
    sys.stdout.flush()
    return code
