"""Vast.ai, the first cloud provider: a small REST client, the instance view, ~/.ssh/config
entries, how an instance knows itself, and the ``Provider`` implementation.

``client`` (httpx, tested against a local HTTP server), ``instances`` (what `status` shows),
``ssh_config`` (the ``Host`` block for VS Code), ``environment`` (``CONTAINER_ID`` and the
injected key), ``provider`` (``VastProvider``: find by SSH address, price, stop, gated
destroy), ``renting`` (``VastRenter``: offers, create, boot state for ``--rent``), ``cli``
(``scripts/launch_vast.py``).
"""
