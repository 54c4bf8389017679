"""``ExportFormat``: what one export format (ONNX, ...) supplies to ``export_run``.

The pipeline (``src.export.pipeline``) does everything every format needs: it checks and
locks the run directory, rebuilds the model as an ``ExportSpec``, gives the format a hidden
temp path for each file it will write, renames the files into place only when ``write``
returned without raising, and writes each one's ``<file>.json`` sidecar. A format only turns
the spec into files and checks them against torch.

Standard library only here (torch comes with the spec), so the list of formats can be read
on a laptop without torch: ``remote_train --export FORMAT`` checks the name before training.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from src.runs.layout import RunLayout

if TYPE_CHECKING:
    from src.export.specs import ExportSpec

Log = Callable[[str], None]  # one line for the user (print, or a list's append in tests)


class ExportFormat(Protocol):
    """One export format; an instance carries its options (``OnnxFormat(int8=True)``)."""

    name: ClassVar[str]  # what --format and remote_train --export take: "onnx"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The format's own command-line options (``--int8``, ``--opset``, ...)."""
        ...

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportFormat:
        """The format with the options ``add_arguments`` parsed."""
        ...

    def targets(self, layout: RunLayout) -> list[Path]:
        """The files this export puts into the run directory, the main one first."""
        ...

    def write(
        self, spec: ExportSpec, staged: Mapping[Path, Path], log: Log
    ) -> dict[Path, dict[str, Any]]:
        """Write each target to its temp path in ``staged`` (target -> temp) and check it.

        Returns each target's format-specific metadata for its sidecar; raises ExportError
        (CheckFailedError for a file that disagrees with torch) to write nothing at all.
        """
        ...
