"""`scripts/launch.py --provider runpod|vast COMMAND ...`: one entry point for every provider.

``--provider vast`` hands the rest of the line to ``src.cloud.vast.cli`` (the same commands
as ``scripts/launch_vast.py``); ``--provider runpod`` to ``src.cloud.runpod.cli``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from src.cloud.runpod import cli as runpod_cli
from src.cloud.vast import cli as vast_cli

PROVIDERS: dict[str, Callable[[list[str] | None], int]] = {
    "runpod": runpod_cli.main,
    "vast": vast_cli.main,
}
USAGE = "usage: launch.py --provider {runpod,vast} COMMAND ... (--provider NAME --help for more)"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    name = None
    for i, arg in enumerate(args):
        if arg == "--provider" and i + 1 < len(args):
            name = args[i + 1]
            del args[i : i + 2]
            break
        if arg.startswith("--provider="):
            name = arg.split("=", 1)[1]
            del args[i]
            break
    if name not in PROVIDERS:
        what = "missing" if name is None else f"unknown provider {name!r}"
        print(f"launch: --provider {what}; {USAGE}", file=sys.stderr)
        return 2
    return PROVIDERS[name](args)
