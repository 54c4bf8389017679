#!/usr/bin/env bash
# Vast.ai "onstart" script: `launch_vast.py create` sends this file's text, and Vast.ai runs it
# at every container start. It installs the runtime dependencies when the repo is already on
# the instance (cloned onto the /workspace volume, or GPU_TRAIN_KIT_DIR set via create's env);
# on a fresh instance it does nothing and says so. With `create --autostop MINUTES` it also
# starts scripts/autostop.py in the background. The log is /workspace/onstart.log (or /tmp).
log=/tmp/onstart.log
[ -d /workspace ] && [ -w /workspace ] && log=/workspace/onstart.log
{
    echo "[onstart] $(date -u +%FT%TZ)"
    for dir in "${GPU_TRAIN_KIT_DIR:-}" /workspace/gpu-train-kit /workspace/persistent/gpu-train-kit /root/gpu-train-kit; do
        if [ -n "$dir" ] && [ -f "$dir/setup/install_deps.sh" ]; then
            echo "[onstart] found the repo in $dir, running setup/install_deps.sh"
            bash "$dir/setup/install_deps.sh" && echo "[onstart] dependencies ready" \
                || echo "[onstart] install_deps.sh failed (exit $?); run it by hand over SSH"
            if [ -n "${GPU_TRAIN_KIT_AUTOSTOP_MINUTES:-}" ]; then
                # Detached: it outlives this script and stops the instance after the idle window.
                echo "[onstart] starting autostop: ${GPU_TRAIN_KIT_AUTOSTOP_MINUTES} idle minutes"
                nohup python3 "$dir/scripts/autostop.py" --idle-minutes "$GPU_TRAIN_KIT_AUTOSTOP_MINUTES" \
                    >>"$log" 2>&1 </dev/null &
            fi
            exit 0
        fi
    done
    echo "[onstart] repo not found (set GPU_TRAIN_KIT_DIR or clone it to /workspace/gpu-train-kit); nothing to install"
    if [ -n "${GPU_TRAIN_KIT_AUTOSTOP_MINUTES:-}" ]; then
        echo "[onstart] autostop not started: it needs the repo; once cloned, run python3 scripts/autostop.py --idle-minutes $GPU_TRAIN_KIT_AUTOSTOP_MINUTES"
    fi
} >>"$log" 2>&1
