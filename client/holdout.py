"""Which of a merchant's customers are held out of online fine-tuning (to judge models on).

The choice is keyed by the merchant's secret, so it is stable across weeks and restarts and
no one else can steer which customers a model is trained or judged on.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pandas as pd

from client.dp_randomness import MerchantSecret


def held_out(customers: pd.Series, *, secret: MerchantSecret, share: float) -> np.ndarray:
    """True for customers in the held-out ``share`` (same customers every time)."""
    if share <= 0 or len(customers) == 0:
        return np.zeros(len(customers), dtype=bool)
    key = secret.derive("holdout-customers")
    unique = pd.unique(customers.astype(str))
    scale = float(1 << 64)
    chosen = {
        c
        for c in unique
        if int.from_bytes(hmac.new(key, c.encode(), hashlib.sha256).digest()[:8], "little") / scale
        < share
    }
    return customers.astype(str).isin(chosen).to_numpy()
