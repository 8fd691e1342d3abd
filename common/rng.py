"""Explicit randomness: one seed in, independent named streams out.

Every random draw in fedshop (negative sampling, Poisson sampling, DP noise, evaluation
candidates) comes from a stream derived here from the run seed and a path of names such as
``("merchant", "store-367", "round", 4, "noise")``. Streams never depend on the order in which
other streams were used, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

StreamKey = str | int


def _entropy(seed: int, path: tuple[StreamKey, ...]) -> list[int]:
    digest = hashlib.sha256(repr((int(seed), *path)).encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]


def derive_seed(seed: int, *path: StreamKey) -> int:
    """A 63-bit integer seed for the stream ``path`` under ``seed``."""
    words = _entropy(seed, path)
    return ((words[0] << 32) | words[1]) & ((1 << 63) - 1)


def numpy_stream(seed: int, *path: StreamKey) -> np.random.Generator:
    """A NumPy generator private to ``path``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy(seed, path))))


def torch_stream(
    seed: int, *path: StreamKey, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A torch generator private to ``path`` (on ``device``, for DP noise drawn there)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *path))
    return generator
