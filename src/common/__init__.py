"""Shared leaf code: errors and exit codes, console lines, atomic file I/O, paths, signals, RNG.

Nothing here imports anything else from ``src``; every other package may import from here.
"""
