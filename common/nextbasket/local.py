"""What a merchant keeps for itself: its blend and its personalised weights (never sent).

:class:`LocalState` is fitted at the merchant after (or between) federated rounds, from the
shared weights and the merchant's own data; it costs no privacy towards the platform because
nothing of it leaves. It is saved as one NumPy archive written atomically, so a restarted
merchant scores with exactly the state it chose, and a crash never leaves half of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.arrays_io import arrays_sha256, arrays_to_npz, npz_to_arrays
from common.atomic import atomic_write_bytes
from common.errors import CheckpointError, ConfigError

_META = "__local_state__"
FORMAT = 1


@dataclass(frozen=True)
class LocalHead:
    """The merchant's blend of the (shared or personal) score with what it knows alone:
    ``score + popularity_weight * log(1 + merchant sales of the product)
    + neighbour_weight * neighbour score`` (:mod:`common.nextbasket.neighbours`: TIFU-KNN over
    the merchant's own households, each case's largest = 1)."""

    popularity_weight: float = 0.0
    neighbour_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("popularity_weight", "neighbour_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)}")

    def apply(
        self, scores: np.ndarray, popularity: np.ndarray, neighbours: np.ndarray | None = None
    ) -> np.ndarray:
        """``scores`` [cases, catalogue]; ``popularity`` [catalogue] merchant sales;
        ``neighbours`` [cases, catalogue] neighbour scores, needed when the weight is not 0."""
        out = scores + self.popularity_weight * np.log1p(popularity)[None, :]
        if self.neighbour_weight:
            if neighbours is None or neighbours.shape != scores.shape:
                raise ValueError("this blend needs the cases' neighbour scores")
            out = out + self.neighbour_weight * neighbours
        return out


@dataclass(frozen=True)
class LocalState:
    """A merchant's local part: the head, and Ditto weights if personalisation won on its
    validation weeks (``prox`` is the strength that won; ``personal`` is empty otherwise).

    ``shared_sha256`` is :func:`common.arrays_io.arrays_sha256` of the shared weights it was
    fitted from ("" if unknown): personal weights replace those shared weights only, never a
    later version's (see :meth:`weights_for`)."""

    merchant_id: str
    head: LocalHead = field(default_factory=LocalHead)
    prox: float | None = None
    personal: dict[str, np.ndarray] = field(default_factory=dict)
    shared_sha256: str = ""

    def __post_init__(self) -> None:
        if (self.prox is None) != (not self.personal):
            raise ConfigError("a local state has personal weights exactly when it has a prox")

    def save(self, path: Path) -> None:
        meta = {
            "format": FORMAT,
            "merchant_id": self.merchant_id,
            "popularity_weight": self.head.popularity_weight,
            "neighbour_weight": self.head.neighbour_weight,
            "prox": self.prox,
            "shared_sha256": self.shared_sha256,
        }
        encoded = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
        atomic_write_bytes(path, arrays_to_npz({**self.personal, _META: encoded}))

    @classmethod
    def load(cls, path: Path, *, merchant_id: str) -> LocalState:
        try:
            arrays = npz_to_arrays(path.read_bytes())
            meta = json.loads(arrays.pop(_META).tobytes().decode())
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: not a readable local state ({exc})") from None
        if meta.get("format") != FORMAT or meta.get("merchant_id") != merchant_id:
            raise CheckpointError(
                f"{path}: local state of {meta.get('merchant_id')!r} (format "
                f"{meta.get('format')}), expected merchant {merchant_id!r} (format {FORMAT})"
            )
        return cls(
            merchant_id=merchant_id,
            head=LocalHead(
                float(meta["popularity_weight"]), float(meta.get("neighbour_weight", 0.0))
            ),
            prox=None if meta["prox"] is None else float(meta["prox"]),
            personal=arrays,
            shared_sha256=str(meta.get("shared_sha256", "")),
        )

    def weights_for(self, shared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The weights to score with on top of ``shared``: the personal ones if they were fitted
        from exactly these shared weights, else ``shared`` (the head applies either way)."""
        if self.personal and self.shared_sha256 and self.shared_sha256 == arrays_sha256(shared):
            return self.personal
        return shared
