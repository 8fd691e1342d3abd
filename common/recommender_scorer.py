"""Full-catalogue scoring with today's model (common/model.py), in NumPy, without torch.

This module is the only place serving knows about the model's internals; the next model replaces
it by registering its own kind in common/scoring.py.

:class:`~common.model.Recommender` scores a candidate from ``[user, item, user*item, log1p(r),
r>0]`` through one hidden layer, where ``user = tanh(W_user · mean(history embeddings))``,
``item`` is the sum of the product, category and department embeddings and ``r`` counts the
candidate in the customer's history. Splitting the hidden layer's weight into its blocks
``[W_u, W_i, W_x, w_r1, w_r2]`` gives, for all N catalogue items at once,

    pre = items · (W_i + W_x ⊙ user)ᵀ + (W_u · user + b)  +  repeat terms on history items only,

one N×d by d×H product per customer, identical to the torch forward pass up to float rounding
(tests/test_serving_scorer.py checks it). A customer with no history here gets the model's
non-personal scores (an empty history, as the model sees a new customer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from common.errors import ConfigError
from common.events import CUSTOMER_ID, PRODUCT_ID, TIMESTAMP
from common.hashing import stable_hash
from common.model_spec import ModelSpec
from common.publication import ModelDescriptor
from common.scoring import Catalogue, MerchantView, TopK, best_k

MODEL_KIND = "fedshop-recommender/1"


def describe(spec: ModelSpec) -> ModelDescriptor:
    """What a publication says about this model, so a merchant can build its scorer."""
    return ModelDescriptor(MODEL_KIND, dataclasses.asdict(spec))


def array_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every array of :class:`~common.model.Recommender` with ``spec``."""
    d, h = spec.embedding_dim, spec.hidden_dim
    return {
        "history_items.weight": (spec.product_buckets, d),
        "items.weight": (spec.product_buckets, d),
        "item_bias.weight": (spec.product_buckets, 1),
        "categories.weight": (spec.category_buckets, d),
        "departments.weight": (spec.department_buckets, d),
        "user.weight": (d, d),
        "user.bias": (d,),
        "hidden.weight": (h, 3 * d + 2),
        "hidden.bias": (h,),
        "out.weight": (1, h),
        "out.bias": (1,),
    }


def _spec(model: ModelDescriptor) -> ModelSpec:
    try:
        return ModelSpec(**dict(model.spec))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model spec {dict(model.spec)!r} is not valid: {exc}") from None


def _histories(events: pd.DataFrame, spec: ModelSpec) -> tuple[dict[str, int], np.ndarray]:
    """Each customer's last ``history_length`` purchases as hashed product ids (0 = padding)."""
    if events.empty:
        return {}, np.zeros((0, spec.history_length), np.int64)
    ordered = events.sort_values([CUSTOMER_ID, TIMESTAMP], kind="stable")
    recent = ordered.groupby(CUSTOMER_ID, sort=True).tail(spec.history_length)
    customers = recent[CUSTOMER_ID].astype(str).to_numpy()
    hashed = stable_hash(recent[PRODUCT_ID], spec.product_buckets)
    codes, names = pd.factorize(customers, sort=True)
    starts = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1]
    slot = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    table = np.zeros((len(names), spec.history_length), np.int64)
    table[codes, slot] = hashed
    return {str(name): i for i, name in enumerate(names)}, table


class RecommenderScorer:
    """Top-K over the whole catalogue for one model version and one merchant's events."""

    def __init__(
        self,
        version_id: int,
        spec: ModelSpec,
        arrays: Mapping[str, np.ndarray],
        events: pd.DataFrame,
    ) -> None:
        self.version_id = version_id
        self.catalogue = Catalogue.from_events(events)
        w = {name: np.asarray(value, dtype=np.float32) for name, value in arrays.items()}
        self._check_shapes(spec, w)
        d = spec.embedding_dim
        items = stable_hash(pd.Series(self.catalogue.product_ids), spec.product_buckets)
        categories = stable_hash(pd.Series(self.catalogue.categories), spec.category_buckets)
        departments = stable_hash(pd.Series(self.catalogue.departments), spec.department_buckets)
        self._item_vec = np.ascontiguousarray(
            w["items.weight"][items]
            + w["categories.weight"][categories]
            + w["departments.weight"][departments]
        )
        self._item_bias = w["item_bias.weight"][items, 0] + w["out.bias"][0]
        self._history_table = w["history_items.weight"]
        self._user_w, self._user_b = w["user.weight"], w["user.bias"]
        hidden = w["hidden.weight"]
        self._w_u, self._w_i, self._w_x = (
            hidden[:, :d],
            hidden[:, d : 2 * d],
            hidden[:, 2 * d : 3 * d],
        )
        self._w_log_repeats, self._w_repeated = hidden[:, 3 * d], hidden[:, 3 * d + 1]
        self._hidden_b, self._out_w = w["hidden.bias"], w["out.weight"][0]
        self._by_hash = np.argsort(items, kind="stable")  # catalogue rows sorted by hashed id
        self._sorted_hashes = items[self._by_hash]
        self._customers, self._histories = _histories(events, spec)
        self._empty = np.zeros(spec.history_length, np.int64)

    @staticmethod
    def _check_shapes(spec: ModelSpec, w: Mapping[str, np.ndarray]) -> None:
        expected = array_shapes(spec)
        found = {name: tuple(value.shape) for name, value in w.items()}
        if found != expected:
            raise ConfigError(
                f"model arrays do not fit the published model spec {spec}: expected {expected}, "
                f"got {found}"
            )

    def history(self, customer_id: str) -> np.ndarray | None:
        """The customer's hashed recent purchases, or ``None`` for a customer new here."""
        row = self._customers.get(customer_id)
        return None if row is None else self._histories[row]

    def scores(self, history: np.ndarray) -> np.ndarray:
        """Logits for every catalogue product given one hashed history [L] (0 = padding)."""
        present = history[history > 0]
        pooled = (
            self._history_table[present].mean(axis=0)
            if len(present)
            else np.zeros(self._user_b.shape, np.float32)
        )
        user = np.tanh(self._user_w @ pooled + self._user_b)
        mixing = self._w_i + self._w_x * user[None, :]
        pre = self._item_vec @ mixing.T
        pre += self._w_u @ user + self._hidden_b
        hashes, counts = np.unique(present, return_counts=True)
        first = np.searchsorted(self._sorted_hashes, hashes, side="left")
        last = np.searchsorted(self._sorted_hashes, hashes, side="right")
        for start, stop, count in zip(first.tolist(), last.tolist(), counts.tolist(), strict=True):
            rows = self._by_hash[start:stop]  # catalogue products with this hashed id, if any
            pre[rows] += self._w_log_repeats * np.float32(np.log1p(count)) + self._w_repeated
        np.maximum(pre, 0.0, out=pre)
        return pre @ self._out_w + self._item_bias

    def top_k(self, customer_ids: Sequence[str], k: int) -> TopK:
        histories = [self.history(str(c)) for c in customer_ids]
        scores = np.stack([self.scores(self._empty if h is None else h) for h in histories])
        index, values = best_k(scores, k)
        return TopK(
            customer_ids=tuple(str(c) for c in customer_ids),
            products=self.catalogue.product_ids[index],
            scores=values.astype(np.float32),
            known=np.array([h is not None for h in histories], dtype=bool),
        )


def build_scorer(
    version_id: int,
    model: ModelDescriptor,
    arrays: Mapping[str, np.ndarray],
    view: MerchantView,
) -> RecommenderScorer:
    return RecommenderScorer(version_id, _spec(model), arrays, view.events)
