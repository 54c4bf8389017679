"""Cloud providers: the machines you rent, found, priced, stopped and destroyed.

``provider``: the ``Provider`` protocol every provider implements, and ``Machine``.
``registry``: which providers are configured (laptop) or rent this machine (on it), and
``hourly_rate_here``, the one function through which a run learns its $/h.
``renting``: the ``Renter`` seam ``remote_train --rent`` drives (offers, create, boot state).
``autostop``: stop this machine once its GPUs sit idle. ``vast``: Vast.ai, the first provider.
"""
