"""Hyperparameter sweep over any experiment: grid/random, or an Optuna study; docs/sweeps.md.

    python scripts/sweep.py --config configs/sweep_example.yaml
    python scripts/sweep.py --config configs/sweep_example.yaml --dry-run
    python scripts/sweep.py --config configs/sweep_example.yaml sweep.gpus=[0,1,2,3]
    python scripts/sweep.py --config configs/sweep_optuna.yaml            # TPE + pruning
    python scripts/sweep.py --config configs/sweep_optuna.yaml --report   # the report only

Re-running the same command skips finished trials and resumes interrupted ones. Several
machines share one Optuna study through sweep.storage=postgresql://... ($OPTUNA_STORAGE).
Exit code: 0 all trials done, 1 a trial failed, 2 bad sweep file, 75 interrupted.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.config import EXIT_CONFIG_ERROR, ConfigError
from src.sweeps.hparam import SweepSpec, load_sweep, run_sweep, table_columns, uses_optuna
from src.sweeps.optuna_report import write_report
from src.sweeps.optuna_study import open_study, run_study
from src.sweeps.runner import exit_code, format_table


def study_main(spec: SweepSpec, args: argparse.Namespace) -> int:
    if args.dry_run:
        raise ConfigError("--dry-run lists a grid/random sweep; an Optuna study draws as it goes")
    if args.report:
        setup, code = open_study(spec, create=False), 0
    else:
        outcome = run_study(spec)
        setup, code = outcome.setup, outcome.exit_code
    print(write_report(setup).text())
    print(f"summary: {setup.paths.summary_dir}/summary.json, summary.csv and plots/")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="sweep file with a sweep: section")
    parser.add_argument("--dry-run", action="store_true", help="print the trials, run nothing")
    parser.add_argument("--report", action="store_true", help="Optuna: the report only")
    parser.add_argument("overrides", nargs="*", help="sweep.key=value changes to the file")
    args = parser.parse_args()
    try:
        spec = load_sweep(args.config, args.overrides)
        if uses_optuna(spec):
            return study_main(spec, args)
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
