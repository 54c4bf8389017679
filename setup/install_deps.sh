#!/usr/bin/env bash
# Install the runtime dependencies into the current Python environment.
#   bash setup/install_deps.sh                    # runtime only, with python3 (or $PYTHON)
#   bash setup/install_deps.sh --dev              # plus test/dev tools (pytest, ruff, moto, jupyter...)
#   bash setup/install_deps.sh --python /opt/conda/bin/python
# Safe to re-run, and fast the second time: a stamp (.deps-installed-*) keyed on the
# requirement files and the interpreter skips pip when nothing changed.
# Never replaces a torch that is already importable (a CUDA build on a pytorch/pytorch image
# stays as is: pip gets it as a constraint). Says clearly when the host has no usable GPU.
# TORCH_SPEC overrides what gets installed when no torch is present (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
req=requirements.txt
while [ $# -gt 0 ]; do
    case "$1" in
    --dev) req=requirements-dev.txt ;;
    --python) PYTHON=${2:?--python needs a path}; shift ;;
    --python=*) PYTHON=${1#--python=} ;;
    *) echo "[install_deps] unknown option $1: use --dev and/or --python PATH" >&2; exit 2 ;;
    esac
    shift
done
say() { echo "[install_deps] $*"; }
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }
export PIP_ROOT_USER_ACTION=${PIP_ROOT_USER_ACTION:-ignore}  # containers run as root

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    say "python interpreter '$PYTHON' not found: pass --python PATH (e.g. /opt/conda/bin/python)" >&2
    exit 127
fi

# What the stamp stands for: the requirement files, and which interpreter they went into.
stamp=".deps-installed-$(basename "$req" .txt)"
key=$({
    cat "$req" requirements.txt
    echo "$PYTHON"
    "$PYTHON" -c 'import sys; print(sys.executable, sys.version)'
} | sha256sum | cut -c1-64)

gpu_check() {
    # $1: the torch line recorded at install time ("<version> <cuda or -> <cuda available 0/1>").
    local torch_version cuda available gpus
    read -r torch_version cuda available <<<"$1"
    gpus=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | sed -n 's/^GPU [0-9]*: \([^(]*\).*/\1/p' | sed 's/ *$//' | paste -sd, -) || gpus=""
    fi
    if [ -z "$gpus" ] && [ "$available" != 1 ]; then
        say "no GPU on this host (nvidia-smi finds none, torch.cuda.is_available() is False): training runs on the CPU"
    elif [ "$available" != 1 ]; then
        say "WARNING: nvidia-smi sees GPU(s) ($gpus) but torch $torch_version cannot use them (CUDA: $cuda): training would run on the CPU; install a CUDA build of torch"
    else
        say "GPU: ${gpus:-visible to torch} (torch $torch_version, CUDA $cuda)"
    fi
}

if [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$key" ]; then
    say "$req unchanged since the last install into $PYTHON: nothing to do"
    gpu_check "$(sed -n 2p "$stamp")"
    exit 0
fi

torch_probe='import torch; print(torch.__version__, torch.version.cuda or "-", int(torch.cuda.is_available()))'
if torch_line=$("$PYTHON" -c "$torch_probe" 2>/dev/null); then
    say "torch ${torch_line%% *} already installed, keeping it"
else
    say "no torch found, installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
    torch_line=$("$PYTHON" -c "$torch_probe")
fi
torch_version=${torch_line%% *}

# The installed torch as a constraint: a requirement that would need another torch fails
# loudly instead of swapping a CUDA build for a CPU one.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
say "installing $req"
pip_install -r "$req" -c "$constraints"
version_now=$("$PYTHON" -c 'from importlib.metadata import version; print(version("torch"))')
if [ "$version_now" != "$torch_version" ]; then
    say "torch changed during the install (was $torch_version): check $req" >&2
    exit 1
fi
gpu_check "$torch_line"
printf '%s\n%s\n' "$key" "$torch_line" >"$stamp"
