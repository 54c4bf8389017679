#!/usr/bin/env bash
# Install the runtime dependencies into the current Python environment.
# Safe to re-run: it installs only what is missing, and never replaces a torch
# that is already importable (a CUDA build on a pytorch/pytorch image stays as is).
#   bash setup/install_deps.sh          # runtime only
#   bash setup/install_deps.sh --dev    # plus test/dev tools (pytest, ruff, moto, jupyter...)
# TORCH_SPEC overrides what gets installed when no torch is present (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[install_deps] torch $("$PYTHON" -c 'import torch; print(torch.__version__)') already installed, keeping it"
else
    echo "[install_deps] no torch found, installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
fi

req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
stamp=".deps-installed-$(basename "$req" .txt)"
# Skip pip's resolver (slow) when the requirement file has not changed since the last install.
if [ -f "$stamp" ] && cmp -s "$stamp" "$req"; then
    echo "[install_deps] $req unchanged since last install, skipping pip"
else
    echo "[install_deps] installing $req"
    pip_install -r "$req"
    cp "$req" "$stamp"
fi
