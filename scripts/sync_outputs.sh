#!/usr/bin/env bash
# Download a Vast.ai instance's outputs over SSH, verify every file, optionally mirror to S3.
#   ./scripts/sync_outputs.sh [-p PORT] [-q] HOST LOCAL_DIR REMOTE_DIR
#   ./scripts/sync_outputs.sh            # SYNC_HOST, SYNC_LOCAL_DIR, SYNC_REMOTE_DIR from .env
# HOST is an ~/.ssh/config alias (see `launch_vast.py ssh-config`) or user@host.
# S3_BUCKET (+ S3_PREFIX, S3_ENDPOINT_URL) set: the verified files are uploaded too.
# SYNC_SSH_OPTS adds ssh options (e.g. "-i ~/.ssh/vast_ed25519").
# Symlinks on the instance are followed (their files come home and are verified).
# Stages and exit codes: connect 10, transfer 11, verify 12, upload 13; bad arguments 2.
# The logic lives in src/storage/output_sync.py (docs/vast_and_sync.md).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for tool in ssh rsync; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "sync_outputs: connect failed: '$tool' not found: install it (apt-get install openssh-client rsync)" >&2
        exit 10
    }
done
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m src.storage.output_sync "$@"
