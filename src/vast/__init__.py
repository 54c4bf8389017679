"""Vast.ai: a small REST client, the instance view, ~/.ssh/config entries and the hourly rate.

Kept apart from ``scripts/launch_vast.py`` so it can be tested against a local HTTP server
and reused by the trainer (``src.vast.pricing.detect_hourly_rate``).
"""
