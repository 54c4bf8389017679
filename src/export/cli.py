"""The export command line: ``scripts/export.py`` (any format) and ``scripts/export_onnx.py``
(ONNX) are this ``main`` with and without the format fixed.

Prints the export's lines; bad input is one line on stderr and exit 2, an export that
disagrees with torch one line and exit 1. Either way nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.export.errors import ExportError
from src.export.pipeline import export_run
from src.export.registry import format_class, format_names


def build_parser(fmt: str | None, description: str) -> argparse.ArgumentParser:
    """The options every format has, and ``--format`` unless ``fmt`` fixes it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("run_dir", type=Path, help="<paths.output_dir>/<run_name>")
    if fmt is None:
        parser.add_argument("--format", required=True, choices=format_names())
    parser.add_argument("--weights", choices=["best", "final"], default="best")
    parser.add_argument("--spec", help="module:function building your model's ExportSpec")
    return parser


def _format_in(argv: list[str]) -> str | None:
    """``--format``'s value in ``argv`` if it names a format (read before the full parse,
    since the format's options depend on it)."""
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--format")
    name = chooser.parse_known_args(argv)[0].format
    return name if name in format_names() else None


def main(argv: list[str] | None = None, fmt: str | None = None, description: str = "") -> int:
    """Export the run named on the command line; ``fmt`` None: ``--format`` says which."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(fmt, description or "Export a finished run, checked against torch.")
    chosen = fmt or _format_in(argv)
    if chosen is not None:
        format_class(chosen).add_arguments(parser)
    args = parser.parse_args(argv)
    export_format = format_class(chosen or args.format).from_args(args)
    try:
        export_run(
            args.run_dir,
            export_format,
            args.weights,
            spec=args.spec,
            log=lambda line: print(line, flush=True),
        )
    except ExportError as error:
        print(error.line, file=sys.stderr)
        return error.exit_code
    return 0
