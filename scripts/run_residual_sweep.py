"""Residual-stream comparison of base vs SFT models over the config's inventory; docs/sweeps.md.

    python scripts/run_residual_sweep.py --config configs/dev_config.yaml --skip-existing
    python scripts/run_residual_sweep.py --config configs/dev_config.yaml --names llama-3.1-8b
    python scripts/run_residual_sweep.py --config configs/dev_config.yaml --dry-run
    python scripts/run_residual_sweep.py --config configs/dev_config.yaml --force

Exit code: 0 all entries done, 1 an entry failed, 2 bad config or --names,
3 the GPU guardrail refused (see --force), 75 interrupted.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.config import EXIT_CONFIG_ERROR, ConfigError, default_config_path, load_dotenv_file
from src.sweeps.residual_compare import run_residual_sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="default: dev/prod config picked by DEV_MODE")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="only these inventory entries")
    parser.add_argument("--skip-existing", action="store_true", help="skip entries with a JSON")
    parser.add_argument("--dry-run", action="store_true", help="print commands, run nothing")
    parser.add_argument("--force", action="store_true", help="run even if the GPU guardrail fails")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. residual_compare.device=cpu")
    args = parser.parse_args()
    try:
        load_dotenv_file()
        return run_residual_sweep(
            args.config or default_config_path(),
            args.overrides,
            names=args.names,
            skip_existing=args.skip_existing,
            dry_run=args.dry_run,
            force=args.force,
        )
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
