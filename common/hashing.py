"""Stable hashing of product, category and department ids into the model's fixed vocabularies.

Torch-free, so that scoring at the merchant (client/serving) hashes exactly as training does
without importing torch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_HASH_KEY = "fedshop-v1-hash!"  # 16 bytes: pandas' stable SipHash key


def stable_hash(values: pd.Series, buckets: int) -> np.ndarray:
    """Hash strings into ``1..buckets-1`` (0 is padding), identically on every machine."""
    hashed = pd.util.hash_pandas_object(values.astype(str), index=False, hash_key=_HASH_KEY)
    return (hashed.to_numpy(dtype=np.uint64) % np.uint64(buckets - 1)).astype(np.int64) + 1
