"""Named arrays to and from NumPy ``.npz`` bytes: the only on-disk weight format (never pickled)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import Any

import numpy as np


def arrays_to_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    payload: dict[str, Any] = {name: np.ascontiguousarray(value) for name, value in arrays.items()}
    np.savez(buffer, **payload)
    return buffer.getvalue()


def npz_to_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Content hash of named arrays (names, dtypes, shapes, bytes), independent of order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(str(value.dtype).encode() + b"\0" + repr(value.shape).encode() + b"\0")
        digest.update(value.tobytes())
    return digest.hexdigest()
