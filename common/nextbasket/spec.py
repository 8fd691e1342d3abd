"""Shapes of the next-basket scorer and of its DP training records (torch-free).

The shared part's shape must be identical at every merchant and on the platform; product,
category and department ids are hashed into fixed vocabularies (:func:`hashed_ids`: pandas'
keyed SipHash, the same on every machine) so that no catalogue is ever exchanged.

:func:`describe` is what a serving publication says about the model (its kind and shape), and
:func:`spec_of` is how a merchant reads it back before it builds a scorer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.errors import ConfigError
from common.nextbasket.features import FEATURES
from common.publication import ModelDescriptor

MODEL_KIND = "fedshop-nextbasket/1"

_HASH_KEY = "fedshop-v1-hash!"  # 16 bytes: the SipHash key; changing it misaligns merchants


def hashed_ids(values: np.ndarray, buckets: int) -> np.ndarray:
    """Strings hashed into ``1..buckets-1`` (0 is padding), identically on every machine."""
    series = pd.Series(np.asarray(values, dtype=object)).astype(str)
    hashed = pd.util.hash_pandas_object(series, index=False, hash_key=_HASH_KEY)
    return (hashed.to_numpy(dtype=np.uint64) % np.uint64(buckets - 1)).astype(np.int64) + 1


@dataclass(frozen=True)
class ScorerSpec:
    """Shape of the shared scorer. Small on purpose: DP noise is added to every shared
    parameter at every step, so each one must earn its place."""

    product_buckets: int = 1 << 15
    category_buckets: int = 1 << 10
    department_buckets: int = 64
    embedding_dim: int = 16
    hidden_dim: int = 64

    def __post_init__(self) -> None:
        for name in ("product_buckets", "category_buckets", "department_buckets"):
            if getattr(self, name) < 2:
                raise ConfigError(f"model.{name} must be >= 2, got {getattr(self, name)}")
        for name in ("embedding_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def features(self) -> int:
        return len(FEATURES)


@dataclass(frozen=True)
class RecordSpec:
    """Candidates of one training basket and baskets per customer-level record.

    Each basket contributes its in-catalogue items (at most ``max_positives``, drawn at
    random if more), up to ``history_negatives`` products of the household's own history
    that it did not buy this time, and ``uniform_negatives`` draws, uniform with replacement,
    from the rest of the catalogue.
    """

    max_positives: int = 24
    history_negatives: int = 48
    uniform_negatives: int = 48
    baskets_per_customer: int = 4

    def __post_init__(self) -> None:
        for name in ("max_positives", "baskets_per_customer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("history_negatives", "uniform_negatives"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.history_negatives + self.uniform_negatives == 0:
            raise ConfigError("a record needs negatives: history_negatives + uniform_negatives")

    @property
    def candidates(self) -> int:
        return self.max_positives + self.history_negatives + self.uniform_negatives


def describe(spec: ScorerSpec) -> ModelDescriptor:
    """What a publication says about the shared scorer, so a merchant can build it."""
    return ModelDescriptor(MODEL_KIND, dataclasses.asdict(spec))


def spec_of(model: ModelDescriptor, *, version_id: int) -> ScorerSpec:
    """The scorer shape a publication names; another kind or a bad shape is a clear error."""
    if model.kind != MODEL_KIND:
        raise ConfigError(
            f"model kind {model.kind!r} of version {version_id} cannot be served by this "
            f"installation (it serves {MODEL_KIND!r}); install the fedshop release the "
            "platform runs"
        )
    try:
        return ScorerSpec(**dict(model.spec))
    except TypeError as exc:
        raise ConfigError(f"model spec {dict(model.spec)!r} is not valid: {exc}") from None
