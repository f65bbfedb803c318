"""Seeded random generators, one stream per (seed, key): the same key draws the same numbers in every run."""
from __future__ import annotations

import zlib
from typing import Optional, Union

import torch

# Spreads the seeds of different keys apart, so that (seed, key) and (seed + 1, key) share no stream.
_SEED_STRIDE = 1_000_003


def seeded_generator(seed: int, key: Optional[Union[str, int]] = None) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``key``.

    Args:
        seed: The configured seed.
        key: A name (a layer's, a block's: hashed with CRC-32, which is stable across processes, unlike
            ``hash``) or an index (a calibration batch's); ``None`` seeds with ``seed`` alone.
    """
    if key is None:
        return torch.Generator().manual_seed(int(seed))
    offset = zlib.crc32(key.encode()) if isinstance(key, str) else int(key)
    return torch.Generator().manual_seed(int(seed) * _SEED_STRIDE + offset)
