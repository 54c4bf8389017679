"""RunPod, the second cloud provider: a small REST client, the pod view, how a pod knows
itself, and the ``Provider`` implementation.

``client`` (httpx against rest.runpod.io/v1, plus one GraphQL read for GPU prices), ``pods``
(what `status` shows, the SSH address), ``provider`` (``RunPodProvider``: find by SSH
address, price, stop, gated terminate), ``renting`` (``RunPodRenter``: GPU types as offers,
create, boot state for ``remote_train --rent --provider runpod``), ``cli``
(``scripts/launch.py --provider runpod``).
"""
