#!/usr/bin/env bash
# System packages the tests use for real: OpenSSH server/client, rsync and tmux
# (tests start their own sshd on 127.0.0.1; remote_train runs training in tmux), and
# Slurm + munge (tests start their own one-node cluster), PostgreSQL (the Optuna sweep test
# starts its own server on loopback). Installs with apt when missing.
set -euo pipefail
missing=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    echo "[install_test_deps] installing ${missing[*]} with apt"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
bash "$(dirname "$0")/install_slurm.sh"
bash "$(dirname "$0")/install_deps.sh" --dev
