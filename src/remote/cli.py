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
``--rent QUERY`` (no HOST: the machine is rented, checked, used and released; exit 19 when
the offer loop gives up) and ``--rented``: ``rent``.
"""

from __future__ import annotations

import os
import sys

from src.cloud.provider import CloudError
from src.remote.args import UsageError, parse_args
from src.remote.pipeline import RemoteTrain
from src.remote.rent import list_rented, rent
from src.remote.rent_state import RentState, state_path
from src.remote.stages import EXIT_DETACHED, EXIT_USAGE, StageError, StageReporter
from src.storage.output_sync import load_settings


def rented(argv: list[str], reporter: StageReporter) -> int:
    """``remote_train --rented [--state-file PATH]``: the machines --rent holds, with cost."""
    rest = [token for token in argv if token != "--rented"]
    explicit = None
    if rest[:1] == ["--state-file"] and len(rest) == 2:
        explicit = rest[1]
    elif rest:
        reporter.error("--rented takes only --state-file PATH")
        return EXIT_USAGE
    try:
        return list_rented(load_settings(os.environ), RentState(state_path(explicit)))
    except (CloudError, OSError) as error:
        reporter.error(f"--rented: {error}")
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reporter = StageReporter()
    if "--rented" in argv:
        return rented(argv, reporter)
    try:
        args, experiments = parse_args(argv)
    except UsageError as error:
        reporter.error(error)
        return EXIT_USAGE
    settings = load_settings(os.environ)
    try:
        if args.rent_query is not None:
            state = RentState(state_path(args.state_file))
            return rent(args, experiments, settings, reporter, state)
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
