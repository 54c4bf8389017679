"""`scripts/remote_train.py`: one command from the laptop to a trained, verified, downloaded run.

    connect -> sync -> install -> train (tmux, streamed) [-> export] -> retrieve -> verify
    -> shutdown

Each stage prints one line when it starts and one when it ends, with its duration. A failure
prints ``remote_train: <stage> failed: <reason>`` (one line), exits with the stage's code
(connect 10, sync 11, install 12, train 13, retrieve 14, verify 15, shutdown 16, export 17;
bad input 2) and never stops or destroys anything. A crashed run is still retrieved and
verified. An interrupted run (exit 75) is retrieved and verified, then remote_train exits 75
without stopping the instance. Ctrl-C while a run streams detaches (exit 130): training goes
on. The arguments: ``args``; the stages: ``pipeline``; ``--status``'s table: ``status_table``.
"""

from __future__ import annotations

import os
import sys

from src.remote.args import UsageError, parse_args
from src.remote.pipeline import RemoteTrain
from src.remote.stages import EXIT_DETACHED, EXIT_USAGE, StageError, StageReporter
from src.storage.output_sync import load_settings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reporter = StageReporter()
    try:
        args, experiments = parse_args(argv)
    except UsageError as error:
        reporter.error(error)
        return EXIT_USAGE
    settings = load_settings(os.environ)
    try:
        return RemoteTrain(args, experiments, settings, reporter).run()
    except UsageError as error:
        reporter.error(error)
        return EXIT_USAGE
    except StageError as error:
        reporter.error(error)
        return error.exit_code
    except KeyboardInterrupt:
        reporter.error("interrupted; nothing was stopped or destroyed")
        return EXIT_DETACHED


if __name__ == "__main__":
    sys.exit(main())
