"""Vast.ai: a small REST client, the instance view, ~/.ssh/config entries, the hourly rate
and the idle auto-stop.

Kept apart from ``scripts/launch_vast.py`` so it can be tested against a local HTTP server
and reused: the trainer learns its $/h through ``src.utils.gpu_monitor.hourly_rate``, which
asks ``src.vast.pricing`` on a Vast.ai instance.
"""
