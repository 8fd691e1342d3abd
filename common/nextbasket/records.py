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
from common.nextbasket.baskets import (
    BasketLog,
    CaseSet,
    catalogue_positions,
    concatenated_ranges,
)
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


@dataclass(frozen=True)
class Candidates:
    """Every case's candidates, case after case: ``slots[indptr[i]:indptr[i + 1]]`` are case
    ``i``'s catalogue slots (its positives, then history negatives, then uniform negatives)
    with their ``log_q`` and ``target``; a case without a rankable item has none."""

    indptr: np.ndarray  # [cases + 1]
    slots: np.ndarray  # int64
    log_q: np.ndarray  # float32
    target: np.ndarray  # int8

    def sizes(self) -> np.ndarray:
        return np.diff(self.indptr)


def _rank_in_group(group: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random order within each group (``group`` sorted): (order, rank of each
    element of ``order`` within its group)."""
    order = np.lexsort((rng.random(len(group)), group))
    starts = np.searchsorted(group, group[order], side="left")
    return order, np.arange(len(order)) - starts


def _count(group: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(group, minlength=n).astype(np.int64)


def basket_candidates(
    cases: CaseSet, features: HistoryFeatures, spec: RecordSpec, rng: np.random.Generator
) -> Candidates:
    """Candidates of every case (one target basket each), all cases at once.

    Per case: positives are its distinct catalogue items (at most ``max_positives``, a uniform
    subset when there are more); history negatives are up to ``history_negatives`` distinct
    products of its own history it did not buy now, drawn without replacement; uniform
    negatives are ``uniform_negatives`` draws with replacement from the catalogue minus its
    history and basket. ``log_q`` corrects each negative for its sampling rate (module
    docstring, rule 3).
    """
    n, size = len(cases), len(cases.catalogue)
    if size == 0:
        return Candidates(
            np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
            np.zeros(0, np.int8),
        )  # fmt: skip
    item_case = cases.case_of_item()
    rankable = cases.basket_slot >= 0
    bought = np.unique(item_case[rankable] * size + cases.basket_slot[rankable])  # sorted
    bought_case = bought // size
    n_bought = _count(bought_case, n)

    order, rank = _rank_in_group(bought_case, rng)
    positives = np.sort(bought[order[rank < spec.max_positives]])
    n_positives = np.minimum(n_bought, spec.max_positives)

    width = features.n_products
    history_case = features.pair_key // width
    history_product = features.pair_key % width
    slot, inside = catalogue_positions(cases.catalogue, history_product)
    history = history_case[inside] * size + slot[inside]  # sorted: pair keys are
    in_basket = np.isin(history, bought, assume_unique=True)
    unbought = history[~in_basket]
    unbought_case = unbought // size
    usable = n_bought > 0
    unbought = unbought[usable[unbought_case]]
    unbought_case = unbought // size
    n_unbought = _count(unbought_case, n)
    order, rank = _rank_in_group(unbought_case, rng)
    from_history = unbought[order[rank < spec.history_negatives]]
    taken = np.minimum(n_unbought, spec.history_negatives)

    excluded = np.union1d(history, bought)
    excluded_case = excluded // size
    pool = size - _count(excluded_case, n)
    draws = np.where(usable & (pool > 0), spec.uniform_negatives, 0)
    draw_case = np.repeat(np.arange(n), draws)
    k = rng.integers(0, np.maximum(pool[draw_case], 1))
    # the k-th catalogue slot outside the case's sorted excluded slots e_0 < e_1 < ...:
    # k + #{j : e_j - j <= k}, counted per case with keys case * (size + 1) + (e_j - j)
    position = np.arange(len(excluded)) - np.searchsorted(excluded_case, excluded_case)
    shifted = excluded_case * (size + 1) + (excluded % size - position)
    below = np.searchsorted(shifted, draw_case * (size + 1) + k, side="right")
    first = np.searchsorted(shifted, draw_case * (size + 1), side="left")
    uniform = draw_case * size + k + (below - first)

    keys = np.concatenate([positives, from_history, uniform])
    part = np.repeat(
        np.arange(3, dtype=np.int64), [len(positives), len(from_history), len(uniform)]
    )
    arrange = np.lexsort((np.arange(len(keys)), part, keys // size))
    keys, part = keys[arrange], part[arrange]
    case = keys // size
    with np.errstate(divide="ignore"):
        history_q = np.where(taken > 0, np.log(n_unbought / np.maximum(taken, 1)), 0.0)
        uniform_q = np.where(draws > 0, np.log(pool / np.maximum(draws, 1)), 0.0)
    log_q = np.select([part == 1, part == 2], [history_q[case], uniform_q[case]], 0.0)
    counts = n_positives + taken + draws
    return Candidates(
        indptr=np.r_[0, np.cumsum(counts)].astype(np.int64),
        slots=(keys % size).astype(np.int64),
        log_q=log_q.astype(np.float32),
        target=np.where(part == 0, POSITIVE, NEGATIVE).astype(np.int8),
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
    candidates = basket_candidates(cases, features, spec, rng)
    usable = candidates.sizes() > 0
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
    starts, ends = candidates.indptr[case], candidates.indptr[case + 1]
    sizes = ends - starts
    picked = concatenated_ranges(starts, ends)
    slots = candidates.slots[picked]
    owner = np.repeat(np.arange(len(case)), sizes)
    position = np.arange(len(slots)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    products = cases.catalogue[slots]
    at = (record[owner], basket[owner], position)
    out.features[at] = features.lookup(case[owner], products)
    out.items[at] = items[products]
    out.log_q[at] = candidates.log_q[picked]
    out.target[at] = candidates.target[picked]
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
