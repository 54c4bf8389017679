"""Known GPUs' dense peaks and PCIe link rates: what a measured figure is judged against.

Dense figures (the vendor sheets print "with sparsity" as twice these). GeForce and RTX
cards: bf16 with fp32 accumulation, as torch uses.
"""

from __future__ import annotations

from dataclasses import dataclass

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
