"""The export command line: ``scripts/export.py`` (any format) and ``scripts/export_onnx.py``
(ONNX) are this ``main`` with and without the format fixed.

Prints the export's lines; bad input is one line on stderr and exit 2, an export that
disagrees with its source (torch, the adapter model) one line and exit 1. Either way nothing
is written. The options themselves are ``src.export.arguments``'.
"""

from __future__ import annotations

import sys

from src.export.arguments import build_parser, format_in
from src.export.errors import ExportError
from src.export.pipeline import export_run
from src.export.registry import format_class


def main(argv: list[str] | None = None, fmt: str | None = None, description: str = "") -> int:
    """Export the run named on the command line; ``fmt`` None: ``--format`` says which."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(fmt, description or "Export a finished run, checked against torch.")
    chosen = fmt or format_in(argv)
    if chosen is not None:
        format_class(chosen).add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        export_format = format_class(chosen or args.format).from_args(args)
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
