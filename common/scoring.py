"""Scoring a merchant's whole catalogue for its customers: the one interface serving depends on.

A :class:`Scorer` is built from three things, all at the merchant: a model version's shared arrays
(verified from the merchant's mirror), the merchant's own events (its customers' histories and its
catalogue) and its state directory (where a model may keep merchant-local parameters that never
leave). :func:`build_scorer` picks the adapter by the model kind the platform's publication names;
a new model plugs in by adding its kind to :data:`SCORER_FACTORIES`, and nothing in serving changes.

Ranking rule shared by every scorer: higher score first; equal scores keep the catalogue's order
(products sorted by id), so a top-K list is a pure function of the scores.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from common.errors import ConfigError
from common.events import CATEGORY, DEPARTMENT, PRODUCT_ID
from common.publication import ModelDescriptor

# model kind -> "module:function" building its scorer (imported only when that kind is served)
SCORER_FACTORIES: dict[str, str] = {
    "fedshop-recommender/1": "common.recommender_scorer:build_scorer",
}


@dataclass(frozen=True)
class Catalogue:
    """The products a merchant sold, sorted by id: what it can recommend."""

    product_ids: np.ndarray  # [N] str
    categories: np.ndarray  # [N] str
    departments: np.ndarray  # [N] str

    def __len__(self) -> int:
        return len(self.product_ids)

    @classmethod
    def from_events(cls, events: pd.DataFrame) -> Catalogue:
        """Every product in ``events``, with the category and department of its latest event."""
        latest = events.drop_duplicates(PRODUCT_ID, keep="last").sort_values(PRODUCT_ID)
        return cls(
            product_ids=latest[PRODUCT_ID].astype(str).to_numpy(dtype=object),
            categories=latest[CATEGORY].astype(str).to_numpy(dtype=object),
            departments=latest[DEPARTMENT].astype(str).to_numpy(dtype=object),
        )


@dataclass(frozen=True)
class MerchantView:
    """What a scorer may read at the merchant: its own events and its state directory."""

    events: pd.DataFrame  # canonical events (common/events.py), oldest first
    state_dir: Path


@dataclass(frozen=True)
class TopK:
    """The best ``k`` products for each customer, best first."""

    customer_ids: tuple[str, ...]
    products: np.ndarray  # [B, k] product ids
    scores: np.ndarray  # [B, k] float32
    known: np.ndarray  # [B] bool: False = no history at this merchant (cold start)


class Scorer(Protocol):
    """Ranks the merchant's catalogue for customers with one model version."""

    version_id: int
    catalogue: Catalogue

    def top_k(self, customer_ids: Sequence[str], k: int) -> TopK: ...


ScorerFactory = Callable[[int, ModelDescriptor, Mapping[str, np.ndarray], MerchantView], Scorer]


def build_scorer(
    version_id: int,
    model: ModelDescriptor,
    arrays: Mapping[str, np.ndarray],
    view: MerchantView,
) -> Scorer:
    """The scorer for ``model.kind``; an unknown kind is a clear error, never a guess."""
    target = SCORER_FACTORIES.get(model.kind)
    if target is None:
        known = ", ".join(sorted(SCORER_FACTORIES))
        raise ConfigError(
            f"model kind {model.kind!r} of version {version_id} cannot be served by this "
            f"installation (known kinds: {known}); upgrade fedshop at the merchant"
        )
    module, function = target.split(":")
    factory: ScorerFactory = getattr(importlib.import_module(module), function)
    return factory(version_id, model, arrays, view)


def best_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of each row's ``k`` highest scores, best first; ties go to the
    lower index. ``scores`` is [B, N]; ``k`` is capped at N."""
    rows, n = scores.shape
    k = min(k, n)
    if k == 0:
        return np.zeros((rows, 0), np.int64), np.zeros((rows, 0), scores.dtype)
    threshold = np.partition(scores, n - k, axis=1)[:, n - k]
    index = np.empty((rows, k), dtype=np.int64)
    for row in range(rows):
        candidates = np.flatnonzero(scores[row] >= threshold[row])
        order = np.lexsort((candidates, -scores[row, candidates]))[:k]
        index[row] = candidates[order]
    return index, np.take_along_axis(scores, index, axis=1)
