#!/usr/bin/env bash
# Slurm and munge for tests/test_slurm.py, which starts its own one-node cluster in a temp
# directory (tests/support/slurm_cluster.py): Debian's slurm-wlm (slurmctld, slurmd, the
# client commands) and munge. Installs with apt only what is missing; quiet when all is there.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]; }
missing=()
for program in slurmctld slurmd sbatch srun; do
    have "$program" || { missing+=(slurm-wlm); break; }
done
have munged || missing+=(munge)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install_slurm] no apt-get: install ${missing[*]} (Slurm and munge) with your package manager" >&2
    exit 1
fi
echo "[install_slurm] installing ${missing[*]} with apt"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
# Recommends would add the -dev and database plugins; the daemons need only their Depends.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
