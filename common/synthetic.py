"""Seeded synthetic merchant logs, for fast tests and scale benchmarks only.

Synthetic data is never used to report model quality: its signal is whatever this module
puts in. It mimics the shape of real grocery logs: a Zipf-skewed catalogue, merchants that
favour their own categories (non-IID clients), customers with latent category preferences
and a strong habit of re-buying items from their own history, and optional drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.errors import ConfigError
from common.events import (
    BRAND,
    CATEGORY,
    CUSTOMER_ID,
    DEPARTMENT,
    MERCHANT_ID,
    PRICE,
    PRODUCT_ID,
    QUANTITY,
    REQUIRED_COLUMNS,
    SORT_COLUMNS,
    TIMESTAMP,
    TIMESTAMP_DTYPE,
)
from common.rng import numpy_stream
from common.split import WEEK

ORIGIN = pd.Timestamp("2017-01-02", tz="UTC")
"""Week 1 of synthetic data starts on this Monday, 00:00 UTC."""
SECONDS_PER_WEEK = 7 * 24 * 3600
CATEGORIES_PER_DEPARTMENT = 5
CUSTOMER_CONCENTRATION = 0.3
"""Dirichlet concentration of a customer's own category taste: small means focused."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the generator; the same spec and seed always give the same table."""

    n_merchants: int = 4
    customers_per_merchant: int = 200
    n_products: int = 1_000
    n_categories: int = 20
    events_per_merchant: int = 5_000
    weeks: int = 53
    popularity_skew: float = 1.1
    merchant_skew: float = 0.7
    drift: float = 0.0
    repeat_rate: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("n_merchants", "customers_per_merchant", "n_products", "n_categories")
        for name in (*positive, "events_per_merchant"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"synthetic.{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.weeks <= 53:
            raise ConfigError(f"synthetic.weeks must be in 1..53, got {self.weeks}")
        if self.n_categories > self.n_products:
            raise ConfigError(
                f"synthetic.n_categories ({self.n_categories}) must be <= "
                f"n_products ({self.n_products})"
            )
        if not self.popularity_skew >= 0:
            raise ConfigError(f"synthetic.popularity_skew must be >= 0, got {self.popularity_skew}")
        for name in ("merchant_skew", "repeat_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"synthetic.{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.drift >= 0:
            raise ConfigError(f"synthetic.drift must be >= 0, got {self.drift}")


@dataclass(frozen=True)
class _Catalogue:
    category: np.ndarray  # product -> category, products grouped by category
    cum_weight: np.ndarray  # category + within-category cumulative popularity, in (c, c+1]
    price: np.ndarray
    labels: dict[str, np.ndarray]  # column -> text per product


def _catalogue(spec: SyntheticSpec) -> _Catalogue:
    rng = numpy_stream(spec.seed, "synthetic", "catalogue")
    n, c = spec.n_products, spec.n_categories
    category = np.sort(np.concatenate([np.arange(c), rng.integers(0, c, size=n - c)]))
    popularity = 1.0 / np.arange(1, n + 1) ** spec.popularity_skew
    popularity = popularity[rng.permutation(n)]
    totals = np.bincount(category, weights=popularity, minlength=c)
    cum = np.cumsum(popularity)
    start = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
    within = (cum - start[category]) / totals[category]
    price = np.round(np.exp(rng.normal(1.0, 0.7, size=n)), 2)
    brand = rng.integers(0, max(1, n // 10), size=n)
    labels = {
        PRODUCT_ID: _labels("p", np.arange(n)),
        CATEGORY: _labels("cat-", category),
        DEPARTMENT: _labels("dept-", category // CATEGORIES_PER_DEPARTMENT),
        BRAND: _labels("brand-", brand),
    }
    return _Catalogue(category, category + np.minimum(within, 1.0), price, labels)


def _labels(prefix: str, numbers: np.ndarray) -> np.ndarray:
    return np.char.add(prefix, numbers.astype("U")).astype(object)


def _category_tastes(spec: SyntheticSpec, merchant: int) -> np.ndarray:
    """Per-customer category distributions (customers x categories), merchant-skewed."""
    rng = numpy_stream(spec.seed, "synthetic", "merchant", merchant, "tastes")
    c = spec.n_categories
    favoured = rng.permutation(c)[: max(1, c // 4)]
    shop = np.full(c, (1.0 - spec.merchant_skew) / c)
    shop[favoured] += spec.merchant_skew / len(favoured)
    own = rng.dirichlet(np.full(c, CUSTOMER_CONCENTRATION), size=spec.customers_per_merchant)
    return 0.5 * shop[None, :] + 0.5 * own


def _sample_rows(rng: np.random.Generator, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One categorical draw per entry of ``rows`` from ``probs[row]`` (vectorised)."""
    cum = np.cumsum(probs, axis=1)
    cum /= cum[:, -1:]
    flat = (cum + np.arange(len(probs))[:, None]).ravel()
    hits = np.searchsorted(flat, rows + rng.random(len(rows)), side="right")
    return np.minimum(hits - rows * probs.shape[1], probs.shape[1] - 1)


def _merchant_events(spec: SyntheticSpec, merchant: int, catalogue: _Catalogue) -> pd.DataFrame:
    rng = numpy_stream(spec.seed, "synthetic", "merchant", merchant, "events")
    n = spec.events_per_merchant
    activity = rng.lognormal(0.0, 1.0, size=spec.customers_per_merchant)
    customer = rng.choice(spec.customers_per_merchant, size=n, p=activity / activity.sum())
    seconds = rng.integers(0, spec.weeks * SECONDS_PER_WEEK - 3600, size=n)
    order = np.lexsort((seconds, customer))
    customer, seconds = customer[order], seconds[order]
    week = seconds // SECONDS_PER_WEEK + 1
    category = _sample_rows(rng, _category_tastes(spec, merchant), customer)
    category = (category + np.floor(spec.drift * (week - 1)).astype(np.int64)) % spec.n_categories
    product = np.searchsorted(catalogue.cum_weight, category + rng.random(n), side="left")
    product = np.minimum(product, spec.n_products - 1)
    product = _apply_repeats(rng, customer, product, spec.repeat_rate)
    seconds = _unique_seconds(customer, product, seconds)
    week = seconds // SECONDS_PER_WEEK + 1
    quantity = 1.0 + rng.poisson(0.3, size=n)
    return pd.DataFrame(
        {
            MERCHANT_ID: f"merchant-{merchant:03d}",
            CUSTOMER_ID: _labels(f"m{merchant:03d}-c", np.arange(spec.customers_per_merchant))[
                customer
            ],
            TIMESTAMP: ORIGIN + pd.to_timedelta(seconds, unit="s"),
            QUANTITY: quantity,
            PRICE: catalogue.price[product],
            **{name: labels[product] for name, labels in catalogue.labels.items()},
            WEEK: week.astype("int64"),
        }
    )


def _apply_repeats(
    rng: np.random.Generator, customer: np.ndarray, product: np.ndarray, repeat_rate: float
) -> np.ndarray:
    """With probability ``repeat_rate`` an event re-buys a product from an earlier event.

    Events are sorted by (customer, time). A repeat points at a uniformly chosen earlier
    event of the same customer; pointer jumping resolves chains to an original purchase.
    """
    n = len(customer)
    starts = np.flatnonzero(np.r_[True, customer[1:] != customer[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    position = np.arange(n) - first
    repeat = (rng.random(n) < repeat_rate) & (position > 0)
    pointer = np.arange(n)
    earlier = first + np.floor(rng.random(n) * position).astype(np.int64)
    pointer[repeat] = earlier[repeat]
    while True:
        jumped = pointer[pointer]
        if np.array_equal(jumped, pointer):
            break
        pointer = jumped
    return product[pointer]


def _unique_seconds(customer: np.ndarray, product: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Shift a repeated (customer, product, second) by one second until keys are unique."""
    seconds = seconds.copy()
    while True:
        keys = pd.DataFrame({"c": customer, "p": product, "s": seconds})
        rank = keys.groupby(["c", "p", "s"], sort=False).cumcount().to_numpy()
        if not rank.any():
            return seconds
        seconds += rank


def generate_events(spec: SyntheticSpec) -> pd.DataFrame:
    """A canonical event table plus ``week`` (int64), deterministic for ``spec``."""
    catalogue = _catalogue(spec)
    frames = [_merchant_events(spec, m, catalogue) for m in range(spec.n_merchants)]
    frame = pd.concat(frames, ignore_index=True)
    for name in (MERCHANT_ID, CUSTOMER_ID, PRODUCT_ID, CATEGORY, DEPARTMENT, BRAND):
        frame[name] = frame[name].astype("str")
    frame[TIMESTAMP] = frame[TIMESTAMP].astype(TIMESTAMP_DTYPE)
    frame = frame[[*REQUIRED_COLUMNS, WEEK]]
    return frame.sort_values(list(SORT_COLUMNS), kind="stable").reset_index(drop=True)
