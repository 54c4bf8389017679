"""The export command's options: ``scripts/export.py RUN_DIR --format FORMAT [options]``.

Imports no torch, so ``remote_train --export FORMAT --export-args=...`` reads the same options
on the laptop: to check them before training, and to know which files the export on the
host wrote (``ExportFormat.targets``) when they come home.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from src.export.errors import ExportError
from src.export.format import ExportFormat
from src.export.registry import format_class, format_names


class _RaisingParser(argparse.ArgumentParser):
    """A parser whose errors are ExportError, not a usage message and exit."""

    def error(self, message: str):  # type: ignore[override]
        raise ExportError(message)


def build_parser(
    fmt: str | None, description: str, parser_class: type[argparse.ArgumentParser] | None = None
) -> argparse.ArgumentParser:
    """The options every format has, and ``--format`` unless ``fmt`` fixes it."""
    parser = (parser_class or argparse.ArgumentParser)(description=description)
    parser.add_argument("run_dir", type=Path, help="<paths.output_dir>/<run_name>")
    if fmt is None:
        parser.add_argument("--format", required=True, choices=format_names())
    parser.add_argument("--weights", choices=["best", "final"], default="best")
    parser.add_argument("--spec", help="module:function building your model's ExportSpec")
    return parser


def format_in(argv: list[str]) -> str | None:
    """``--format``'s value in ``argv`` if it names a format (read before the full parse,
    since the format's options depend on it)."""
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--format")
    name = chooser.parse_known_args(argv)[0].format
    return name if name in format_names() else None


def format_from_options(name: str, options: list[str]) -> ExportFormat:
    """The format ``scripts/export.py RUN_DIR --format NAME *options`` exports with;
    ExportError (one line) for an option it would refuse."""
    parser = build_parser(name, "", parser_class=_RaisingParser)
    format_class(name).add_arguments(parser)
    args = parser.parse_args(["run_dir", *options])
    return format_class(name).from_args(args)
