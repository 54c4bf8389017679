"""A run directory: what it holds (``RunLayout``), who may write it (the lock), its JSON files.

Everything that reads or writes a run's files names them through ``RunLayout``; nothing
else spells ``best_model.pt`` or ``checkpoints/``.
"""
