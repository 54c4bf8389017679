#!/usr/bin/env python3
"""Stop this Vast.ai instance when its GPUs have sat idle (logic: src/cloud/autostop.py).

    python scripts/autostop.py --idle-minutes 20            # on the instance, in tmux
    python scripts/autostop.py --idle-minutes 20 --dry-run  # say what it would do
    python scripts/launch_vast.py create OFFER --autostop 20   # started by the onstart script

Idle: no CUDA process on any GPU, utilization under --util-percent, and no training run of
this repo holding its run lock under --outputs. It stops (disk kept), never destroys.
Exit codes: 0 stopped (or would have, with --dry-run), 2 it cannot work here (not on
Vast.ai, no API key, no NVIDIA driver, a bad option). A failed stop request is retried.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.cloud.autostop import (
    DEFAULT_INTERVAL_S,
    DEFAULT_UTIL_PERCENT,
    AutostopError,
    check_machine,
    stop_target,
    watch,
)
from src.common.paths import DEFAULT_PERSISTENT_DIR, resolve_output_dir
from src.config import load_dotenv_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autostop.py", description=__doc__.splitlines()[0])
    parser.add_argument("--idle-minutes", type=float, required=True, help="idle this long: stop")
    parser.add_argument("--util-percent", type=float, default=DEFAULT_UTIL_PERCENT)
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="s per check")
    parser.add_argument("--outputs", help="outputs root with the runs' locks (default: config's)")
    parser.add_argument("--dry-run", action="store_true", help="say what it would do; stop nothing")
    args = parser.parse_args(argv)
    if args.idle_minutes <= 0 or args.interval <= 0 or not 0 < args.util_percent <= 100:
        print(
            "autostop: --idle-minutes and --interval must be > 0, --util-percent in (0, 100]",
            file=sys.stderr,
        )
        return 2
    load_dotenv_file()
    try:
        provider, machine_id = stop_target()
        outputs = resolve_output_dir(args.outputs or DEFAULT_PERSISTENT_DIR)
        check_machine(outputs, args.util_percent)  # fails now, not after the first window
    except (AutostopError, PermissionError) as error:
        print(f"autostop: {error}", file=sys.stderr)
        return 2

    machine = f"{provider.machine_kind} {machine_id}"

    def stop() -> None:
        if args.dry_run:
            print(f"autostop: --dry-run: would stop {machine} now (GPU released, disk kept)")
            return
        provider.stop(machine_id)
        print(f"autostop: stopped {machine}: GPU released, disk kept")

    print(
        f"autostop: watching {machine}: stop after {args.idle_minutes:g} min idle "
        f"(GPU util < {args.util_percent:g}%, no CUDA process, no run lock in {outputs})",
        flush=True,
    )
    try:
        watch(
            args.idle_minutes * 60,
            lambda: check_machine(outputs, args.util_percent),
            stop,
            interval_s=args.interval,
            echo=lambda line: print(f"autostop: {line}", flush=True),
        )
    except AutostopError as error:
        print(f"autostop: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autostop: interrupted; nothing stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
