"""Run ``run_tasks`` in a process of its own, so tests can signal or kill a real sweep.

    python tests/support/sweep_runner_driver.py DIR CHILD_CODE NAME...

Each NAME becomes a task ``python -c CHILD_CODE NAME`` logging to ``DIR/NAME.log``; prints
the summary table and exits with the runner's exit code.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.sweeps.runner import Task, exit_code, run_tasks, summary_table

if __name__ == "__main__":
    directory, code, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    tasks = [Task(n, [sys.executable, "-c", code, n], directory / f"{n}.log") for n in names]
    results = run_tasks(tasks)
    print(summary_table(results))
    sys.exit(exit_code(results))
