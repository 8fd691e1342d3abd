"""The Complete Journey adapter: mapping, cleaning, store selection, cache and week calendar."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import completejourney as cj
from common.errors import ConfigError
from common.events import REQUIRED_COLUMNS, TIMESTAMP_DTYPE, validate_events


def raw_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A miniature CJ: 3 stores, a return, an exact duplicate and an unknown product."""
    stamps = pd.to_datetime(
        [
            "2017-01-01 12:00",  # week 1
            "2017-01-01 12:00",  # same key as above: merged
            "2017-01-02 06:00",  # week 2 (after Monday 00:00 New York)
            "2017-01-03 09:00",
            "2017-01-03 10:00",  # return (quantity 0): dropped
            "2017-01-04 10:00",
            "2017-01-05 10:00",
        ]
    )
    transactions = pd.DataFrame(
        {
            "household_id": [1, 1, 2, 3, 3, 4, 5],
            "store_id": [10, 10, 10, 20, 20, 20, 30],
            "basket_id": range(7),
            "product_id": [100, 100, 101, 100, 101, 999, 101],
            "quantity": [1, 2, 4, 1, 0, 2, 1],
            "sales_value": [1.0, 2.5, 2.0, 1.5, 0.0, 3.0, 0.5],
            "week": [1, 1, 2, 2, 2, 2, 2],
            "transaction_timestamp": stamps,
        }
    )
    products = pd.DataFrame(
        {
            "product_id": [100, 101],
            "manufacturer_id": [1, 2],
            "department": ["DAIRY", " PRODUCE "],
            "brand": ["National", "Private"],
            "product_category": ["MILK", None],
            "product_type": ["x", "y"],
            "package_size": [None, None],
        }
    )
    return transactions, products


def test_build_maps_and_cleans() -> None:
    frame, report = cj.build_events(*raw_tables())
    assert report == cj.CleaningReport(
        raw_rows=7,
        dropped_nonpositive_quantity=1,
        dropped_negative_sales=0,
        merged_duplicate_rows=1,
        rows_without_product_metadata=1,
        rows=5,
    )
    canonical = validate_events(frame, source="cj", extra_columns=("week",))
    merged = canonical[(canonical["customer_id"] == "1")].iloc[0]
    assert merged["merchant_id"] == "store-10" and merged["quantity"] == 3.0
    assert merged["price"] == pytest.approx(3.5 / 3)
    assert merged["category"] == "MILK" and merged["brand"] == "National"
    produce = canonical[canonical["customer_id"] == "2"].iloc[0]
    assert (produce["department"], produce["category"], produce["price"]) == ("PRODUCE", "", 0.5)
    unknown = canonical[canonical["product_id"] == "999"].iloc[0]
    assert (unknown["department"], unknown["brand"]) == ("", "")
    assert canonical["timestamp"].iloc[0] == pd.Timestamp("2017-01-01 12:00", tz="UTC")
    cj.check_weeks(canonical)


def test_week_calendar_mismatch_is_caught() -> None:
    frame, _ = cj.build_events(*raw_tables())
    frame.loc[0, "week"] = 7
    with pytest.raises(Exception, match="week 7"):
        cj.check_weeks(frame)


def test_ranking_breaks_ties_by_numeric_store_id() -> None:
    frame = pd.DataFrame(
        {"merchant_id": ["store-9", "store-10", "store-10", "store-100", "store-9"]}
    )
    ranking = cj.store_ranking(frame)
    assert ranking["merchant_id"].tolist() == ["store-9", "store-10", "store-100"]
    frame = pd.DataFrame({"merchant_id": ["store-100", "store-10", "store-9"]})
    assert cj.store_ranking(frame)["merchant_id"].tolist() == ["store-9", "store-10", "store-100"]


def test_load_merchants_selects_and_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    def fake() -> tuple[pd.DataFrame, pd.DataFrame]:
        calls.append(1)
        return raw_tables()

    monkeypatch.setattr(cj, "_raw_tables", fake)
    top = cj.load_merchants(top_n=2, min_rows=1, cache_dir=tmp_path)
    assert sorted(top["merchant_id"].unique()) == ["store-10", "store-20"]
    assert list(top.columns) == [*REQUIRED_COLUMNS, "week"]
    assert str(top["timestamp"].dtype) == TIMESTAMP_DTYPE
    again = cj.load_merchants(top_n=2, min_rows=1, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(top, again)
    assert len(calls) == 1, "the second load must come from the cache"
    assert cj.cache_path(tmp_path).name.startswith(f"completejourney-{cj.package_version()}-")
    with pytest.raises(ConfigError, match="only 0 Complete Journey stores have >= 3"):
        cj.load_merchants(top_n=2, min_rows=3, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="top_n"):
        cj.load_merchants(top_n=0, cache_dir=tmp_path)


def test_stale_or_corrupt_cache_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cj, "_raw_tables", raw_tables)
    path = cj.cache_path(tmp_path)
    path.write_bytes(b"not parquet")
    frame = cj.load_all(cache_dir=tmp_path)
    assert len(frame) == 5
    pd.testing.assert_frame_equal(pd.read_parquet(path), frame)


@pytest.mark.slow
def test_real_data_counts_and_calendar(tmp_path: Path) -> None:
    start = time.perf_counter()
    top = cj.load_merchants(top_n=10, min_rows=10_000, cache_dir=tmp_path)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    warm_top = cj.load_merchants(top_n=10, min_rows=10_000, cache_dir=tmp_path)
    warm = time.perf_counter() - start
    print(f"Complete Journey load: cold {cold:.1f} s, warm {warm:.1f} s")
    pd.testing.assert_frame_equal(top, warm_top)
    assert warm < cold
    full = cj.load_all(cache_dir=tmp_path)
    assert len(full) == 1_460_428
    assert full["merchant_id"].nunique() == 457
    assert full["customer_id"].nunique() == 2_469
    counts = top["merchant_id"].value_counts()
    assert counts.index[0] == "store-367" and counts.iloc[0] == 41_038
    assert len(counts) == 10 and counts.min() == 21_610
    assert len(top) == 265_245
    cj.check_weeks(full)
    assert np.array_equal(np.sort(full["week"].unique()), np.arange(1, 54))
    transactions, products = cj._raw_tables()
    _, report = cj.build_events(transactions, products)
    assert (report.raw_rows, report.dropped_nonpositive_quantity) == (1_469_307, 8_869)
    assert (report.merged_duplicate_rows, report.rows_without_product_metadata) == (10, 32)


@pytest.mark.slow
def test_complete_journey_keeps_its_weeks() -> None:
    """The time split of the default run is the provider's weeks: same parts as counting
    the week column, with the counts of docs/data.md, and weekly slices 41-53 to stream."""
    from common.config import RunConfig
    from common.datasets import load_dataset
    from common.split import SplitRule, split_events

    config = RunConfig()
    dataset = load_dataset(config)
    assert dataset.split.rule is SplitRule.WEEKS
    parts = dataset.parts()
    for merchant, group in dataset.events.groupby("merchant_id"):
        by_week = split_events(group.reset_index(drop=True), config.data.week_split)
        for name, frame in by_week.items():
            pd.testing.assert_frame_equal(frame, parts[str(merchant)][name])
    sizes = {name: sum(len(p[name]) for p in parts.values()) for name in ("train", "valid", "test")}
    assert sizes == {"train": 204_131, "valid": 19_746, "test": 41_368}
    assert np.array_equal(
        dataset.split.slice_numbers(dataset.events["timestamp"]), dataset.events["week"]
    )
    last = dataset.events["timestamp"].max()
    assert [s.number for s in dataset.split.held_out_slices(last_event=last)] == list(range(41, 54))
    assert dataset.split.cohort() == "train:w01-w40"
