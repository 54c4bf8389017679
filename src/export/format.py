"""``ExportFormat``: what one export format (ONNX, Hugging Face, ...) supplies to ``export_run``.

The pipeline (``src.export.pipeline``) does everything every format needs: it checks and
locks the run directory, prepares the format's ``source``, gives the format a hidden temp
path for each target it will write, renames the targets into place only when ``write``
returned without raising, and writes each one's ``<target>.json`` sidecar. A format only
turns its source into files and checks them.

Two sources:

- ``WEIGHTS`` (ONNX): ``best_model.pt`` / ``final_model.pt``, rebuilt into a module by an
  ``ExportSpec`` (``src.export.specs``);
- ``ADAPTER`` (``hf``): a PEFT run's ``best_adapter/`` / ``final_adapter/`` as an
  ``AdapterRun``; the format loads the base itself.

A target is a file or a directory: whatever the format wrote at its temp path. A directory
is renamed into place whole, and its sidecar lists every file in it with sha256 and size.

Standard library only here (torch comes with the spec), so the list of formats can be read
on a laptop without torch: ``remote_train --export FORMAT`` checks the name before training.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from src.runs.layout import RunLayout

if TYPE_CHECKING:
    from src.export.specs import ExportSpec

Log = Callable[[str], None]  # one line for the user (print, or a list's append in tests)

WEIGHTS = "weights"  # ExportFormat.source: a .pt state_dict, rebuilt by an ExportSpec
ADAPTER = "adapter"  # ExportFormat.source: a PEFT run's adapter directory (AdapterRun)


@dataclass(frozen=True)
class AdapterRun:
    """What an ``ADAPTER`` format gets: the run as it is on disk, its adapter checked."""

    run_dir: Path
    config: dict[str, Any]  # config.json: the resolved config (its model: section the base)
    adapter_dir: Path  # best_adapter/ or final_adapter/ (adapter_config.json + safetensors)
    weights: str  # "best" or "final"


class ExportFormat(Protocol):
    """One export format; an instance carries its options (``OnnxFormat(int8=True)``)."""

    name: ClassVar[str]  # what --format and remote_train --export take: "onnx"
    source: ClassVar[str]  # WEIGHTS (write gets an ExportSpec) or ADAPTER (an AdapterRun)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The format's own command-line options (``--int8``, ``--opset``, ...)."""
        ...

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportFormat:
        """The format with the options ``add_arguments`` parsed."""
        ...

    def targets(self, layout: RunLayout) -> list[Path]:
        """The files (or directories) this export puts into the run directory, the main one
        first; the same for the same options, so the laptop can check what came home."""
        ...

    def write(
        self, source: ExportSpec | AdapterRun, staged: Mapping[Path, Path], log: Log
    ) -> dict[Path, dict[str, Any]]:
        """Write each target to its temp path in ``staged`` (target -> temp) and check it.

        Returns each target's format-specific metadata for its sidecar; raises ExportError
        (CheckFailedError for a file that disagrees with its source) to write nothing at all.
        """
        ...
