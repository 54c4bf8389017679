# Run `make help` for the list of targets.
PYTHON ?= python3
export PYTHON
# make test runs test files on this many workers (pytest-xdist); 0 runs them in this process.
# (-p no:benchmark: a pytest-benchmark plugin some images carry would warn under xdist.)
TEST_WORKERS ?= 2

.PHONY: help setup train test lint format bench gpu-check tensorboard clean

help:  ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

setup:  ## install runtime dependencies (keeps an existing torch)
	bash setup/install_deps.sh

train: setup  ## run the template experiment on the dev config (CPU or GPU, local disk, TensorBoard)
	DEV_MODE=True $(PYTHON) experiments/template_experiment.py

test:  ## install test dependencies (apt: openssh, rsync, tmux, slurm, munge) and run the test suite
	bash setup/install_test_deps.sh
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -p no:benchmark

lint:  ## ruff check + format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:  ## apply ruff fixes and formatting
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

gpu-check:  ## on a GPU box: pytest -m gpu, check_instance and the GPU benchmarks -> benchmarks/results/
	$(PYTHON) benchmarks/gpu_check.py

tensorboard:  ## TensorBoard for every run on port 6006 (ssh_config's LocalForward: http://localhost:8080)
	$(PYTHON) -m tensorboard.main --port 6006 --logdir "$${LOGDIR:-$$($(PYTHON) -c 'from src.common.paths import resolve_output_dir; print(resolve_output_dir())')}"

bench:  ## run the benchmarks (prints ratios against their baselines)
	for b in benchmarks/bench_*.py; do $(PYTHON) $$b || exit 1; done

clean:  ## remove local outputs and caches
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
