"""The simple methods a merchant could use instead of a federation, and one library CF.

Each returns full-catalogue scores ``[cases, catalogue]`` for a :class:`CaseSet`; higher is
better. Every method except G-TopFreq breaks its own ties by the merchant's popularity (most
sold first), exactly as P-TopFreq is defined, so that no method loses to the metric's
pessimistic tie rule merely for leaving scores equal.

- G-TopFreq: the merchant's best sellers, the same list for everyone.
- P-TopFreq: how many of its baskets the household bought the product in, then popularity.
- TIFU-KNN (Hu et al., SIGIR 2020): a household vector of time-decayed basket frequencies
  (baskets in groups of ``group_size`` from the newest backwards; decay ``within_decay``
  inside a group, ``group_decay`` across groups), blended with the mean vector of its
  ``neighbours`` nearest households at the merchant (Euclidean distance) as
  ``alpha * own + (1 - alpha) * neighbours``. Local: it needs only the merchant's data.
- ALS (``implicit``): matrix factorisation on the pooled baskets of all merchants, without
  privacy; users are (merchant, household) pairs, so a household's history at one merchant
  is its history there, as for every other method.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from common.errors import ConfigError
from common.nextbasket.baskets import (
    BasketLog,
    CaseSet,
    catalogue_positions,
    concatenated_ranges,
)

Scorer = Callable[[CaseSet], np.ndarray]


def popularity_order(popularity: np.ndarray) -> np.ndarray:
    """Popularity mapped into [0, 1): same order, so it can break ties under integer scores."""
    return popularity / (popularity.max() + 1.0) if len(popularity) else popularity


def break_ties(scores: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """Scores with the same order, ties broken by ``popularity`` ([catalogue]): each row is
    replaced by its dense rank plus the popularity order."""
    out = np.empty(scores.shape, dtype=np.float64)
    tie = popularity_order(popularity)
    for i, row in enumerate(scores):
        _, dense = np.unique(row, return_inverse=True)
        out[i] = dense + tie
    return out


def g_topfreq(cases: CaseSet, popularity: np.ndarray) -> np.ndarray:
    """Everyone gets the merchant's popularity (``popularity`` per product code)."""
    return np.tile(popularity[cases.catalogue].astype(np.float64), (len(cases), 1))


def household_counts(log: BasketLog, cases: CaseSet) -> np.ndarray:
    """[cases, catalogue] baskets of the case's history containing each catalogue product."""
    events = concatenated_ranges(cases.history_start, cases.history_end)
    owner = np.repeat(np.arange(len(cases)), cases.history_end - cases.history_start)
    slot, inside = catalogue_positions(cases.catalogue, log.product[events])
    counts = np.zeros((len(cases), len(cases.catalogue)))
    np.add.at(counts, (owner[inside], slot[inside]), 1.0)
    return counts


def p_topfreq(log: BasketLog, cases: CaseSet, popularity: np.ndarray) -> np.ndarray:
    """The household's own purchase counts, ties broken by the merchant's popularity."""
    return household_counts(log, cases) + popularity_order(popularity[cases.catalogue])


@dataclass(frozen=True)
class TifuParams:
    group_size: int = 7
    within_decay: float = 0.9
    group_decay: float = 0.7
    neighbours: int = 100
    alpha: float = 0.7

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.neighbours < 1:
            raise ConfigError("TIFU-KNN: group_size and neighbours must be >= 1")
        for name in ("within_decay", "group_decay", "alpha"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"TIFU-KNN: {name} must be in [0, 1], got {getattr(self, name)}")


TIFU_GRID: dict[str, tuple[float, ...]] = {
    "group_size": (3, 7, 14),
    "within_decay": (0.9, 1.0),
    "group_decay": (0.5, 0.7, 0.9),
    "neighbours": (10, 50, 200),
    "alpha": (0.5, 0.7, 0.9),
}


def tifu_vectors(
    log: BasketLog, *, before_day: float, catalogue: np.ndarray, params: TifuParams
) -> np.ndarray:
    """[customers, catalogue] TIFU household vectors from the baskets before ``before_day``."""
    kept, weight = tifu_decay_weights(log, before_day=before_day, params=params)
    slot, inside = catalogue_positions(catalogue, log.product[kept])
    vectors = np.zeros((log.n_customers, len(catalogue)))
    np.add.at(vectors, (log.customer[kept][inside], slot[inside]), weight[inside])
    return vectors


def tifu_decay_weights(
    log: BasketLog, *, before_day: float, params: TifuParams
) -> tuple[np.ndarray, np.ndarray]:
    """(event rows before ``before_day``, each one's TIFU weight in its household's vector)."""
    kept = np.flatnonzero(log.day < before_day)
    customer, basket = log.customer[kept], log.basket[kept]
    last = np.full(log.n_customers, -1, dtype=np.int64)
    np.maximum.at(last, customer, basket)
    first = np.full(log.n_customers, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, customer, basket)
    count = np.where(last >= 0, last - first + 1, 0)
    back = last[customer] - basket  # 0 = newest basket
    group, within = back // params.group_size, back % params.group_size
    groups = -(-count // params.group_size)  # ceil
    oldest_size = count - params.group_size * (groups - 1)
    size = np.where(group == groups[customer] - 1, oldest_size[customer], params.group_size)
    weight = (
        params.within_decay**within
        / size
        * params.group_decay**group
        / np.maximum(groups[customer], 1)
    )
    return kept, weight


@dataclass(frozen=True)
class _TifuPool:
    """Household vectors at one cutoff and the cases' distances to the other households."""

    own: np.ndarray  # [cases, catalogue]
    pool: np.ndarray  # [households with history, catalogue]
    order: np.ndarray  # [cases, pool] pool indices, nearest first (oneself last)


def _tifu_pool(log: BasketLog, cases: CaseSet, params: TifuParams) -> _TifuPool:
    before = float(cases.day.min()) if len(cases) else 0.0
    has = cases.history_end > cases.history_start
    if np.any(log.day[cases.history_end[has] - 1] >= before):
        raise ConfigError("TIFU-KNN needs held-out cases: histories must end before every case")
    vectors = tifu_vectors(log, before_day=before, catalogue=cases.catalogue, params=params)
    own = vectors[cases.customer]
    active = np.flatnonzero(vectors.any(axis=1))
    pool = vectors[active]
    squared = (own**2).sum(1)[:, None] + (pool**2).sum(1)[None, :] - 2.0 * own @ pool.T
    squared[active[None, :] == cases.customer[:, None]] = np.inf  # never one's own neighbour
    return _TifuPool(own, pool, np.argsort(squared, axis=1, kind="stable"))


def _tifu_blend(pool: _TifuPool, neighbours: int, alpha: float) -> np.ndarray:
    k = min(neighbours, max(pool.pool.shape[0] - 1, 1))
    nearest = pool.pool[pool.order[:, :k]].mean(axis=1)
    return alpha * pool.own + (1 - alpha) * nearest


def tifu_knn(
    log: BasketLog, cases: CaseSet, popularity: np.ndarray, params: TifuParams
) -> np.ndarray:
    """TIFU-KNN scores; every case must share one cutoff (held-out cases: the period start),
    taken as the earliest case's visit day."""
    blended = _tifu_blend(_tifu_pool(log, cases, params), params.neighbours, params.alpha)
    return break_ties(blended, popularity[cases.catalogue])


def tune_tifu(
    log: BasketLog,
    cases: CaseSet,
    popularity: np.ndarray,
    objective: Callable[[np.ndarray], float],
    grid: Mapping[str, Iterable[float]] = TIFU_GRID,
) -> tuple[TifuParams, float]:
    """The grid point whose scores maximise ``objective`` (first on ties); household vectors
    and neighbour orders are computed once per decay setting."""
    best, best_value = None, -np.inf
    for size, within, across in itertools.product(
        grid["group_size"], grid["within_decay"], grid["group_decay"]
    ):
        decay = TifuParams(group_size=int(size), within_decay=within, group_decay=across)
        pool = _tifu_pool(log, cases, decay)
        for k, alpha in itertools.product(grid["neighbours"], grid["alpha"]):
            scores = break_ties(_tifu_blend(pool, int(k), alpha), popularity[cases.catalogue])
            value = objective(scores)
            if value > best_value:
                best_value = value
                best = TifuParams(int(size), within, across, int(k), alpha)
    assert best is not None
    return best, float(best_value)


@dataclass(frozen=True)
class AlsParams:
    factors: int = 64
    regularization: float = 0.05
    alpha: float = 10.0
    iterations: int = 15


ALS_GRID: tuple[AlsParams, ...] = tuple(
    AlsParams(factors=f, regularization=r, alpha=a)
    for f in (32, 128)
    for r in (0.05, 1.0)
    for a in (1.0, 10.0, 40.0)
)


def als_scores(
    logs: Mapping[str, BasketLog],
    cases: Mapping[str, CaseSet],
    popularity: Mapping[str, np.ndarray],
    *,
    before_week: int,
    params: AlsParams,
    seed: int,
) -> dict[str, np.ndarray]:
    """Central ALS on every merchant's baskets before ``before_week``; scores per merchant."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    names = sorted(logs)
    products = np.unique(np.concatenate([logs[m].product_ids for m in names]).astype(str))
    rows, cols, offsets = [], [], {}
    offset = 0
    for m in names:
        log = logs[m]
        kept = log.week < before_week
        rows.append(log.customer[kept] + offset)
        cols.append(np.searchsorted(products, log.product_ids[log.product[kept]].astype(str)))
        offsets[m] = offset
        offset += log.n_customers
    user_items = sparse.csr_matrix(
        (
            np.ones(sum(len(r) for r in rows), dtype=np.float32),
            (np.concatenate(rows), np.concatenate(cols)),
        ),
        shape=(offset, len(products)),
    )
    user_items.sum_duplicates()
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=seed,
            num_threads=1,
        )
        model.fit(user_items, show_progress=False)
    out = {}
    for m in names:
        log, chosen = logs[m], cases[m]
        item_index = np.searchsorted(products, log.product_ids[chosen.catalogue].astype(str))
        users = model.user_factors[chosen.customer + offsets[m]]
        raw = np.asarray(users) @ np.asarray(model.item_factors[item_index]).T
        out[m] = break_ties(raw, popularity[m][chosen.catalogue])
    return out
