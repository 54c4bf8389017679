"""Hyperparameter sweep (grid or random search) over any experiment; docs/sweeps.md.

    python scripts/sweep.py --config configs/sweep_example.yaml
    python scripts/sweep.py --config configs/sweep_example.yaml --dry-run
    python scripts/sweep.py --config configs/sweep_example.yaml sweep.gpus=[0,1,2,3]

Re-running the same command skips finished trials and resumes interrupted ones.
Exit code: 0 all trials done, 1 a trial failed, 2 bad sweep file, 75 interrupted.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.config import EXIT_CONFIG_ERROR, ConfigError
from src.sweeps.hparam import load_sweep, run_sweep, table_columns
from src.sweeps.runner import exit_code, format_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="sweep file with a sweep: section")
    parser.add_argument("--dry-run", action="store_true", help="print the trials, run nothing")
    parser.add_argument("overrides", nargs="*", help="sweep.key=value changes to the file")
    args = parser.parse_args()
    try:
        spec = load_sweep(args.config, args.overrides)
        outcome = run_sweep(spec, dry_run=args.dry_run)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(format_table(outcome.rows, table_columns(spec)))
    if args.dry_run:
        return 0
    print(f"summary: {outcome.summary_dir}/summary.json and summary.csv")
    return exit_code(outcome.results)


if __name__ == "__main__":
    sys.exit(main())
