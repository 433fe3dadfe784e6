"""Derived seeds: one rule for every random stream of the app.

A stream is named by the user's seed and a few names (task key, analysis, model); the same
seed and names always give the same stream, and different names give independent streams.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, *names: str | int) -> int:
    """A stable seed in ``[0, 2**31)`` from ``seed`` and ``names``.

    Parameters
    ----------
    seed
        The user's seed (``--seed``).
    *names
        Strings (hashed with CRC-32) or non-negative integers naming the stream.

    Returns
    -------
    int
        ``numpy.random.SeedSequence([seed, *names]).generate_state(1)[0] mod 2**31``
        (room for small offsets below 2**32).
    """
    words = [seed] + [zlib.crc32(n.encode()) if isinstance(n, str) else int(n) for n in names]
    return int(np.random.SeedSequence(words).generate_state(1)[0] % 2**31)
