#!/usr/bin/env bash
# Vast.ai "onstart" script: `launch_vast.py create` sends this file's text, and Vast.ai runs it
# at every container start. It installs the runtime dependencies when the repo is already on
# the instance (cloned onto the /workspace volume, or GPU_TRAIN_KIT_DIR set via create's env);
# on a fresh instance it does nothing and says so. The log is /workspace/onstart.log (or /tmp).
log=/tmp/onstart.log
[ -d /workspace ] && [ -w /workspace ] && log=/workspace/onstart.log
{
    echo "[onstart] $(date -u +%FT%TZ)"
    for dir in "${GPU_TRAIN_KIT_DIR:-}" /workspace/gpu-train-kit /workspace/persistent/gpu-train-kit /root/gpu-train-kit; do
        if [ -n "$dir" ] && [ -f "$dir/setup/install_deps.sh" ]; then
            echo "[onstart] found the repo in $dir, running setup/install_deps.sh"
            bash "$dir/setup/install_deps.sh" && echo "[onstart] dependencies ready" \
                || echo "[onstart] install_deps.sh failed (exit $?); run it by hand over SSH"
            exit 0
        fi
    done
    echo "[onstart] repo not found (set GPU_TRAIN_KIT_DIR or clone it to /workspace/gpu-train-kit); nothing to install"
} >>"$log" 2>&1
