"""Reject malformed or hostile model updates before they reach the aggregate."""

from __future__ import annotations

import numpy as np

from common.config import UpdateDtype
from common.errors import RejectedUpdateError
from common.protocol import FLOAT16_MAX

Arrays = dict[str, np.ndarray]


def check_update(
    update: Arrays,
    reference: Arrays,
    *,
    max_update_norm: float,
    dtype: UpdateDtype = UpdateDtype.FLOAT32,
) -> None:
    """Same names and shapes as the global model, in the run's update ``dtype``, finite, and
    a bounded change, all checked on the arrays as received. A float16 value at +-65504 is
    refused: a merchant saturates values beyond float16's range there, so it cannot be told
    from a weight that did not fit."""
    if set(update) != set(reference):
        missing = sorted(set(reference) - set(update))[:3]
        extra = sorted(set(update) - set(reference))[:3]
        raise RejectedUpdateError(f"wrong parameter names (missing {missing}, unexpected {extra})")
    squared = 0.0
    for name, ref in reference.items():
        value = update[name]
        if value.shape != ref.shape:
            raise RejectedUpdateError(f"{name}: shape {value.shape}, expected {ref.shape}")
        if value.dtype != dtype.numpy:
            raise RejectedUpdateError(
                f"{name}: dtype {value.dtype}, expected {dtype.value} (federation.update_dtype)"
            )
        if not np.isfinite(value).all():
            raise RejectedUpdateError(f"{name}: contains NaN or Inf")
        if dtype is UpdateDtype.FLOAT16 and (np.abs(value) >= FLOAT16_MAX).any():
            raise RejectedUpdateError(
                f"{name}: {int(np.count_nonzero(np.abs(value) >= FLOAT16_MAX))} values at "
                f"float16's limit +-{FLOAT16_MAX:g} (saturated: the weights do not fit float16; "
                "run with federation.update_dtype = float32)"
            )
        squared += float(np.sum((value.astype(np.float64) - ref) ** 2))
    norm = squared**0.5
    if norm > max_update_norm:
        raise RejectedUpdateError(f"update norm {norm:.3g} exceeds the bound {max_update_norm:g}")
