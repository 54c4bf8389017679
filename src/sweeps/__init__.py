"""Sweeps: many runs of one program, one subprocess each (see docs/sweeps.md)."""
