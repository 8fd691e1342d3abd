"""DP training records for the shared scorer (torch-free; model.py turns them into tensors).

What one record is, and why its loss is a function of that record alone:

- **event unit**: one target basket. Positives are its items in the catalogue; negatives are
  products of the household's own earlier history it did not buy this time, and uniform
  draws from the rest of the catalogue. Features describe the household's own events before
  the basket. A purchase also appears, as context, in the records of the household's later
  baskets, so the event-level guarantee is per training example (per target basket), not per
  raw purchase (docs/privacy.md, "Event level, read carefully").
- **customer unit**: one household with up to ``baskets_per_customer`` of its target
  baskets, drawn afresh every round; its loss is the mean over those baskets.

Soundness rules this module follows (and tests check):

1. A record's features, candidates and labels come from its own household's events, the
   product catalogue and public product metadata only. The catalogue (what the merchant
   sells: its assortment) is treated as public, like a shop's shelves.
2. Negatives are drawn uniformly (from the catalogue) or from the record's own history;
   never weighted by the merchant's sales. Merchant-wide statistics (popularity,
   co-purchases, repeat rates, neighbours) never enter a record.
3. Sampling corrections (``log_q``) use only the record's own counts and the catalogue size,
   so the sampled softmax estimates the softmax over the whole catalogue:
   history negatives stand for all of the household's unbought history items, uniform
   negatives for every other catalogue product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.accounting import PrivacyUnit
from common.nextbasket.baskets import BasketLog, CaseSet
from common.nextbasket.features import FEATURES, HistoryFeatures
from common.nextbasket.spec import RecordSpec, ScorerSpec, hashed_ids

POSITIVE, NEGATIVE, PADDING = 1, 0, -1


@dataclass(frozen=True)
class RecordArrays:
    """Training records, padded: ``[records, baskets, candidates, ...]``.

    ``target`` is 1 for a positive, 0 for a negative and -1 for padding (a candidate slot or
    a whole basket slot that holds nothing).
    """

    features: np.ndarray  # float32 [N, G, C, F]
    items: np.ndarray  # int64 [N, G, C, 3]: hashed product, category, department
    log_q: np.ndarray  # float32 [N, G, C]
    target: np.ndarray  # int8 [N, G, C]

    def __len__(self) -> int:
        return int(self.features.shape[0])


def item_ids(log: BasketLog, spec: ScorerSpec) -> np.ndarray:
    """[P, 3] hashed (product, category, department) of every product code of ``log``."""
    return np.stack(
        [
            hashed_ids(log.product_ids, spec.product_buckets),
            hashed_ids(log.categories, spec.category_buckets),
            hashed_ids(log.departments, spec.department_buckets),
        ],
        axis=1,
    )


def _draw_outside(
    size: int, excluded: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` uniform draws (with replacement) from ``range(size)`` minus sorted ``excluded``."""
    k = rng.integers(0, size - len(excluded), count)
    return k + np.searchsorted(excluded - np.arange(len(excluded)), k, side="right")


def _basket_candidates(
    cases: CaseSet,
    features: HistoryFeatures,
    case: int,
    spec: RecordSpec,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(catalogue slots, log_q, target) of one basket; empty if it has no rankable item."""
    lo, hi = cases.basket_indptr[case], cases.basket_indptr[case + 1]
    bought = np.unique(cases.basket_slot[lo:hi][cases.basket_slot[lo:hi] >= 0])
    if len(bought) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8)
    positives = bought
    if len(bought) > spec.max_positives:
        positives = np.sort(rng.choice(bought, spec.max_positives, replace=False))
    history = features.history_products(case)
    slot = np.searchsorted(cases.catalogue, history)
    inside = slot < len(cases.catalogue)
    inside[inside] = cases.catalogue[slot[inside]] == history[inside]
    history_slots = slot[inside]
    unbought = np.setdiff1d(history_slots, bought)
    taken = min(spec.history_negatives, len(unbought))
    from_history = rng.choice(unbought, taken, replace=False) if taken else unbought[:0]
    excluded = np.union1d(history_slots, bought)
    pool = len(cases.catalogue) - len(excluded)
    draws = spec.uniform_negatives if pool > 0 else 0
    uniform = _draw_outside(len(cases.catalogue), excluded, draws, rng)
    log_q = np.r_[
        np.zeros(len(positives)),
        np.full(taken, np.log(len(unbought) / taken) if taken else 0.0),
        np.full(draws, np.log(pool / draws) if draws else 0.0),
    ]
    target = np.r_[np.full(len(positives), POSITIVE), np.full(taken + draws, NEGATIVE)].astype(
        np.int8
    )
    return (
        np.r_[positives, from_history, uniform].astype(np.int64),
        log_q.astype(np.float32),
        target,
    )


def _groups(
    cases: CaseSet,
    usable: np.ndarray,
    unit: PrivacyUnit,
    per_customer: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """[records, G] case indices (-1 = empty slot)."""
    rows = np.flatnonzero(usable)
    if unit is PrivacyUnit.EVENT:
        return rows[:, None]
    order = rows[np.lexsort((rng.random(len(rows)), cases.customer[rows]))]
    owner = cases.customer[order]
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    slot = np.arange(len(order)) - np.repeat(starts, counts)
    groups = np.full((len(starts), per_customer), -1, dtype=np.int64)
    keep = slot < per_customer
    groups[np.repeat(np.arange(len(starts)), counts)[keep], slot[keep]] = order[keep]
    return groups


def training_records(
    cases: CaseSet,
    features: HistoryFeatures,
    items: np.ndarray,
    *,
    unit: PrivacyUnit,
    spec: RecordSpec,
    rng: np.random.Generator,
) -> RecordArrays:
    """Records for DP-SGD from training ``cases`` (every basket of the training weeks) and
    their ``features``; ``items`` is :func:`item_ids` of the same log."""
    candidates = [_basket_candidates(cases, features, i, spec, rng) for i in range(len(cases))]
    usable = np.array([len(c[0]) > 0 for c in candidates], dtype=bool)
    groups = _groups(cases, usable, unit, spec.baskets_per_customer, rng)
    n, g, c = len(groups), groups.shape[1], spec.candidates
    out = RecordArrays(
        features=np.zeros((n, g, c, len(FEATURES)), dtype=np.float32),
        items=np.zeros((n, g, c, 3), dtype=np.int64),
        log_q=np.zeros((n, g, c), dtype=np.float32),
        target=np.full((n, g, c), PADDING, dtype=np.int8),
    )
    record, basket = np.nonzero(groups >= 0)
    case = groups[record, basket]
    sizes = np.array([len(candidates[i][0]) for i in case], dtype=np.int64)
    slots = np.concatenate([candidates[i][0] for i in case]) if len(case) else np.zeros(0, int)
    owner = np.repeat(np.arange(len(case)), sizes)
    position = np.arange(len(slots)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    products = cases.catalogue[slots]
    at = (record[owner], basket[owner], position)
    out.features[at] = features.lookup(case[owner], products)
    out.items[at] = items[products]
    if len(case):
        out.log_q[at] = np.concatenate([candidates[i][1] for i in case])
        out.target[at] = np.concatenate([candidates[i][2] for i in case])
    return out


def count_records(cases: CaseSet, unit: PrivacyUnit) -> int:
    """How many records :func:`training_records` will produce (the N of DP accounting):
    baskets with at least one catalogue item, or households with at least one such basket.
    Depends on the data only, never on the random draws."""
    rankable = cases.case_of_item()[cases.basket_slot >= 0]
    usable = np.bincount(rankable, minlength=len(cases)) > 0
    if unit is PrivacyUnit.EVENT:
        return int(usable.sum())
    return len(np.unique(cases.customer[usable]))
