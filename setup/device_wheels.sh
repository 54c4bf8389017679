#!/usr/bin/env bash
# Wheels for a GPU box that cannot reach PyPI (the lent test machine: Python 3.12, x86-64,
# PyTorch, transformers, peft and accelerate already there): the packages the kit and its GPU
# tests need that such an image lacks, pinned to the versions this checkout is tested with.
# Writes .whl/ (git-ignored through .git/info/exclude). On the box, from the repo root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && make gpu-check PYTHON=python3
#
# Left out on purpose (size or no GPU test needs them): wandb (gpu_check passes --no-wandb),
# jupyter, bitsandbytes unless WITH_BNB=1 (about 60 MB: the QLoRA 4-bit test).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-.whl}
PYTHON_VERSION=${DEVICE_PYTHON:-3.12}

PACKAGES=(
    omegaconf==2.4.0 python-dotenv==1.2.2                           # config
    boto3==1.43.11 botocore==1.43.11 s3transfer==0.17.0 jmespath==1.1.0   # S3
    moto==5.2.1 responses==0.26.0 xmltodict==1.0.4 py-partiql-parser==0.6.3  # the S3 tests' server
    flask==3.1.3 flask-cors==6.0.2 blinker==1.9.0 itsdangerous==2.2.0
    cryptography==48.0.0 cffi==2.0.0 pycparser==3.0
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19     # TRL experiment
    optuna==5.1.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 mako==1.4.3  # sweeps
)
if [[ "${WITH_BNB:-0}" == 1 ]]; then
    PACKAGES+=(bitsandbytes)
fi

mkdir -p "$OUT"
python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$OUT" "${PACKAGES[@]}"
if [[ -d .git ]] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
    mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude
fi
echo "[device_wheels] $(ls "$OUT" | wc -l) wheels in $OUT ($(du -sh "$OUT" | cut -f1)); carry it: run(carry=[\"$OUT\"])"
