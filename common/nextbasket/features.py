"""Household features at scoring time, computed from the household's own history only.

For every case (a household at a moment) and every product in that household's history at
the merchant, :func:`history_features` computes purchase frequency, time-decayed frequency at
several half-lives, basket-order decay (the TIFU-KNN notion), recency, the mean repurchase
interval and how "due" the product is. Per case it adds household-level features and the
household's category and department shares. All of these are functions of one household's
events and the scoring moment: a training record built from them depends on that record's
own data only, which is what DP-SGD's clipping bound needs (see model.py).

Every transform is fixed (log1p, shares, clipping); nothing is normalised by statistics of
the merchant's data, which would tie one record's features to everyone else's.

:func:`merchant_popularity` is the exception and says so: it counts the whole merchant's
sales, so it may feed scoring and merchant-local parameters, never the shared DP training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.nextbasket.baskets import BasketLog, CaseSet, concatenated_ranges

HALF_LIVES_DAYS: tuple[float, ...] = (14.0, 60.0, 240.0)
BASKET_DECAYS: tuple[float, ...] = (0.7, 0.9)
AFFINITY_HALF_LIFE_DAYS = 60.0

REPEAT_FEATURES: tuple[str, ...] = (
    "in_history",
    "log_count",
    "share_of_baskets",
    *(f"log_decayed_count_{int(h)}d" for h in HALF_LIVES_DAYS),
    *(f"basket_decay_{r}" for r in BASKET_DECAYS),
    "log_days_since",
    "in_last_basket",
    "bought_twice",
    "log_interval",
    "due",
)
HOUSEHOLD_FEATURES: tuple[str, ...] = (
    "log_baskets",
    "log_days_since_visit",
    "log_products",
    "log_basket_size",
    "repeat_ratio",
    "log_tenure",
    "cold_start",
)
AFFINITY_FEATURES: tuple[str, ...] = (
    "category_share",
    "category_decayed_share",
    "department_share",
    "department_decayed_share",
)
FEATURES: tuple[str, ...] = REPEAT_FEATURES + HOUSEHOLD_FEATURES + AFFINITY_FEATURES
_DUE_CLIP = 4.0


@dataclass(frozen=True)
class HistoryFeatures:
    """Features of a case set: sparse per (case, history product), dense per case.

    ``pair_key = case * n_products + product`` is sorted, so a (case, product) lookup is a
    binary search; products outside the history have zero repeat features.
    """

    n_products: int
    pair_key: np.ndarray  # [M] int64, sorted
    repeat: np.ndarray  # [M, len(REPEAT_FEATURES)] float32
    household: np.ndarray  # [n, len(HOUSEHOLD_FEATURES)] float32
    category_share: np.ndarray  # [n, categories, 2] float32 (plain, decayed)
    department_share: np.ndarray  # [n, departments, 2] float32
    product_category: np.ndarray  # [P] local category code
    product_department: np.ndarray  # [P] local department code

    def pair_case(self) -> np.ndarray:
        return self.pair_key // self.n_products

    def pair_product(self) -> np.ndarray:
        return self.pair_key % self.n_products

    def history_products(self, case: int) -> np.ndarray:
        lo, hi = np.searchsorted(
            self.pair_key, [case * self.n_products, (case + 1) * self.n_products]
        )
        return self.pair_key[lo:hi] - case * self.n_products

    def lookup(self, cases: np.ndarray, products: np.ndarray) -> np.ndarray:
        """[k, len(FEATURES)] float32 features of the pairs (cases[j], products[j])."""
        cases = np.asarray(cases, dtype=np.int64)
        products = np.asarray(products, dtype=np.int64)
        key = cases * self.n_products + products
        at = np.searchsorted(self.pair_key, key)
        found = at < len(self.pair_key)
        found[found] = self.pair_key[at[found]] == key[found]
        repeat = np.zeros((len(key), len(REPEAT_FEATURES)), dtype=np.float32)
        repeat[found] = self.repeat[at[found]]
        category = self.category_share[cases, self.product_category[products]]
        department = self.department_share[cases, self.product_department[products]]
        affinity = np.stack(
            [category[:, 0], category[:, 1], department[:, 0], department[:, 1]], axis=1
        )
        return np.concatenate([repeat, self.household[cases], affinity], axis=1)


def _log(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(x, 0.0))


def _household(
    log: BasketLog, cases: CaseSet, pair_case: np.ndarray, events: np.ndarray, distinct: np.ndarray
) -> np.ndarray:
    n = len(cases)
    start, end = cases.history_start, cases.history_end
    has = end > start
    last = np.where(has, end - 1, 0)
    baskets = np.where(has, log.basket[last] - log.basket[start.clip(max=len(log) - 1)] + 1, 0)
    size = np.where(has, (end - start) / np.maximum(baskets, 1), 0.0)
    repeats = np.bincount(pair_case, weights=log.repeat[events], minlength=n)
    ratio = np.where(has, repeats / np.maximum(end - start, 1), 0.0)
    since = np.where(has, cases.day - log.day[last], 0.0)
    tenure = np.where(has, cases.day - log.day[start.clip(max=len(log) - 1)], 0.0)
    return np.stack(
        [_log(baskets), _log(since), _log(distinct), _log(size), ratio, _log(tenure), ~has],
        axis=1,
    ).astype(np.float32)


def _shares(
    codes: np.ndarray, pair_case: np.ndarray, decay: np.ndarray, n: int, width: int
) -> np.ndarray:
    """[n, width, 2]: each case's share of history events per code, plain and decayed."""
    key = pair_case * width + codes
    plain = np.bincount(key, minlength=n * width).reshape(n, width)
    decayed = np.bincount(key, weights=decay, minlength=n * width).reshape(n, width)
    plain_total = plain.sum(1, keepdims=True)
    decayed_total = decayed.sum(1, keepdims=True)
    out = np.zeros((n, width, 2), dtype=np.float32)
    out[..., 0] = plain / np.maximum(plain_total, 1)
    out[..., 1] = decayed / np.where(decayed_total > 0, decayed_total, 1.0)
    return out


def _group_reduce(values: np.ndarray, starts: np.ndarray, op: np.ufunc) -> np.ndarray:
    return op.reduceat(values, starts) if len(values) else values[:0]


@dataclass(frozen=True)
class ProductCodes:
    """Each product's local category and department code in a log (a function of the log
    only: a caller that scores the same log many times computes it once)."""

    category: np.ndarray  # [P] int64
    department: np.ndarray  # [P] int64


def product_codes(log: BasketLog) -> ProductCodes:
    return ProductCodes(
        category=pd.factorize(log.categories)[0].astype(np.int64),
        department=pd.factorize(log.departments)[0].astype(np.int64),
    )


def history_features(
    log: BasketLog, cases: CaseSet, codes: ProductCodes | None = None
) -> HistoryFeatures:
    """Features of every case's history (see the module docstring); ``codes`` is
    :func:`product_codes` of ``log`` if the caller has it."""
    n = len(cases)
    events = concatenated_ranges(cases.history_start, cases.history_end)
    pair_case = np.repeat(np.arange(n), cases.history_end - cases.history_start)
    product = log.product[events]
    key = pair_case * log.n_products + product
    order = np.argsort(key, kind="stable")  # within a group: oldest event first
    key, events, pair_case = key[order], events[order], pair_case[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else key[:0]
    group_case = pair_case[starts]
    age = cases.day[pair_case] - log.day[events]
    has = cases.history_end > cases.history_start
    last_basket = np.where(has, log.basket[np.maximum(cases.history_end - 1, 0)], 0)
    baskets_back = (last_basket[pair_case] - log.basket[events]).astype(np.float64)
    first_basket = log.basket[cases.history_start.clip(max=len(log) - 1)]
    n_baskets = np.where(has, last_basket - first_basket + 1, 0)[group_case]

    count = np.diff(np.r_[starts, len(key)]).astype(np.float64)
    columns = [np.ones_like(count), _log(count), count / np.maximum(n_baskets, 1)]
    for half_life in HALF_LIVES_DAYS:
        columns.append(_log(_group_reduce(np.exp2(-age / half_life), starts, np.add)))
    for rate in BASKET_DECAYS:
        weight = _group_reduce(rate**baskets_back, starts, np.add)
        columns.append(weight * (1 - rate) / (1 - rate ** np.maximum(n_baskets, 1)))
    since = _group_reduce(age, starts, np.minimum)
    oldest = _group_reduce(age, starts, np.maximum)
    twice = count >= 2
    interval = np.where(twice, (oldest - since) / np.maximum(count - 1, 1), 0.0)
    due = np.where(twice, np.log((since + 1.0) / (interval + 1.0)), 0.0)
    columns += [
        _log(since),
        (_group_reduce(baskets_back, starts, np.minimum) == 0).astype(np.float64),
        twice.astype(np.float64),
        _log(interval),
        np.clip(due, -_DUE_CLIP, _DUE_CLIP),
    ]
    repeat = np.stack(columns, axis=1).astype(np.float32)

    distinct = np.bincount(group_case, minlength=n)
    codes = codes or product_codes(log)
    category, department = codes.category, codes.department
    decay = np.exp2(-age / AFFINITY_HALF_LIFE_DAYS)
    return HistoryFeatures(
        n_products=log.n_products,
        pair_key=key[starts],
        repeat=repeat,
        household=_household(log, cases, pair_case, events, distinct),
        category_share=_shares(
            category[product[order]], pair_case, decay, n, int(category.max()) + 1
        ),
        department_share=_shares(
            department[product[order]], pair_case, decay, n, int(department.max()) + 1
        ),
        product_category=category,
        product_department=department,
    )


def merchant_popularity(log: BasketLog, *, before_week: int) -> np.ndarray:
    """[P] baskets containing each product in the weeks before ``before_week``, over all the
    merchant's customers. Merchant-wide: for scoring and merchant-local parameters only, never
    an input of the shared DP training (it would make every record depend on every other)."""
    sold = log.week < before_week
    return np.bincount(log.product[sold], minlength=log.n_products).astype(np.float64)
