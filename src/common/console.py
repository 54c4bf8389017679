"""Lines for the person watching: the ``[checkpoint]`` notes and warnings on stderr.

The checkpoint manager and the S3 mirror both speak through these, so the two never disagree
on the wording or the stream.
"""

from __future__ import annotations

import sys


def print_note(message: str) -> None:
    """One ``[checkpoint]`` line on stderr (the manager's and the S3 mirror's)."""
    print(f"[checkpoint] {message}", file=sys.stderr, flush=True)


def print_warning(message: str) -> None:
    print(f"[checkpoint] warning: {message}", file=sys.stderr, flush=True)
