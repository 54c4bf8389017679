"""Leaving a ``torch.distributed`` process group at exit, every rank together.

A gloo rank that tears its group down while a peer is still working (rank 0 finishing its S3
uploads, writing results) can abort in the C++ teardown ("terminate called without an active
exception", exit -6) after a run that succeeded. A barrier first lets the ranks leave
together; a peer that is gone already only delays the exit by the timeout.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

# Long enough for rank 0's final uploads (up to 10 minutes) to end before the others leave.
EXIT_BARRIER_S = 15 * 60


def leave_process_group(group: dist.ProcessGroup | None = None) -> None:
    """Destroy ``group`` (None: the default group) once every rank has reached this point."""
    if not dist.is_initialized():
        return
    if dist.get_backend(group) == "gloo":
        try:
            timeout = datetime.timedelta(seconds=EXIT_BARRIER_S)
            dist.monitored_barrier(group=group, timeout=timeout)
        except Exception:  # noqa: BLE001 - a peer already gone: leave without it
            pass
    dist.destroy_process_group(group)
