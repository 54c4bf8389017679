"""The end of a run with an S3 mirror: wait for the last uploads (briefly after a stop, the
machine may be going away), release the mirror and say what is still only on this disk.

One function for the kit's trainer and for ``run_interruptible`` (Hugging Face Trainer): each
passes how it closes its checkpoints (flush local writes, stop the mirror, prune)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from src.storage.checkpoint_mirror import CheckpointMirror, FlushReport
from src.trainers.train_state import Outcome

FINAL_UPLOAD_S = 600.0  # at the end of a run, how long the last S3 uploads may take

# Outcomes after which the machine may be going away: wait only the stop grace. A budget stop
# is not one of them: nothing takes the machine, and its last checkpoint is worth the wait.
HURRIED = (Outcome.INTERRUPTED, Outcome.FAILED)


def finish_uploads(
    mirror: CheckpointMirror | None,
    close: Callable[[float], FlushReport | None],
    outcome: Outcome,
    stop_grace_s: float,
    local_dir: Path,
    say: Callable[[str], None],
) -> None:
    """Wait for the S3 uploads (``stop_grace_s`` at most after a stop or failure), release
    the mirror through ``close(timeout)``, say what is left."""
    if mirror is None or not mirror.running:
        return  # never started (another machine holds the prefix): nothing to report
    mirror.mark_files_dirty()  # final_model.pt, training_log.json, test results
    timeout = stop_grace_s if outcome in HURRIED else max(stop_grace_s, FINAL_UPLOAD_S)
    if not mirror.flush(min(timeout, 2.0)).complete:
        say(f"waiting up to {timeout:.0f} s for the S3 uploads to finish")
    report = close(timeout)
    if report is None:
        return
    where = mirror.url()
    if report.complete:
        newest = f"step {max(report.uploaded)} in " if report.uploaded else ""
        say(f"S3 mirror up to date: {newest}{where}")
        return
    waiting = ", ".join(str(step) for step in report.waiting) or "run files only"
    reason = f" ({mirror.last_error})" if mirror.last_error else ""
    say(
        f"S3 upload not finished within {timeout:.0f} s{reason}: step {waiting} still local "
        f"in {local_dir}; the next run of this command uploads it"
    )
