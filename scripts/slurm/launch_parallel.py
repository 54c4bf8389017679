"""Several runs as separate Slurm jobs, side by side; docs/slurm.md.

    python scripts/slurm/launch_parallel.py --config configs/cases.yaml
    python scripts/slurm/launch_parallel.py --config configs/cases.yaml --dry-run

Prints each job's id and log, and the squeue / scancel commands for all of them.
Exit code: 0 submitted, 1 sbatch failed part way (the line says what was submitted),
2 bad cases file or a job Slurm refuses (nothing submitted).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.config import EXIT_CONFIG_ERROR, ConfigError
from src.slurm.launcher import (
    DEFAULT_LOG_DIR,
    SubmitError,
    describe_dry_run,
    describe_submitted,
    load_cases,
    plan_submissions,
    submit_all,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="cases file, e.g. configs/cases.yaml")
    parser.add_argument(
        "--log-dir",
        default=DEFAULT_LOG_DIR,
        help=f"where the jobs' logs go, from the repo root (default: {DEFAULT_LOG_DIR})",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch commands only")
    args = parser.parse_args()
    try:
        submissions = plan_submissions(load_cases(args.config), args.log_dir)
        if args.dry_run:
            print(describe_dry_run(submissions, args.log_dir))
            return 0
        submitted = submit_all(submissions, args.log_dir)
    except ConfigError as error:
        print(error.line, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except SubmitError as error:
        if error.submitted:
            print(describe_submitted(error.submitted))
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(describe_submitted(submitted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
