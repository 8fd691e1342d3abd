"""Reject malformed or hostile model updates before they reach the aggregate."""

from __future__ import annotations

import numpy as np

from common.errors import RejectedUpdateError

Arrays = dict[str, np.ndarray]


def check_update(update: Arrays, reference: Arrays, *, max_update_norm: float) -> None:
    """Same names, shapes and dtype as the global model, finite, and a bounded change."""
    if set(update) != set(reference):
        missing = sorted(set(reference) - set(update))[:3]
        extra = sorted(set(update) - set(reference))[:3]
        raise RejectedUpdateError(f"wrong parameter names (missing {missing}, unexpected {extra})")
    squared = 0.0
    for name, ref in reference.items():
        value = update[name]
        if value.shape != ref.shape:
            raise RejectedUpdateError(f"{name}: shape {value.shape}, expected {ref.shape}")
        if value.dtype != np.float32:
            raise RejectedUpdateError(f"{name}: dtype {value.dtype}, expected float32")
        if not np.isfinite(value).all():
            raise RejectedUpdateError(f"{name}: contains NaN or Inf")
        squared += float(np.sum((value.astype(np.float64) - ref) ** 2))
    norm = squared**0.5
    if norm > max_update_norm:
        raise RejectedUpdateError(f"update norm {norm:.3g} exceeds the bound {max_update_norm:g}")
