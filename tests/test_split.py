"""Temporal splits: week numbering, split validation, partitions and weekly streaming."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError
from common.split import WeekSplit, split_events, week_of, weeks


def events(stamps: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "merchant_id": "m",
            "customer_id": [f"c{i}" for i in range(len(stamps))],
            "timestamp": pd.to_datetime(stamps, utc=True, format="ISO8601"),
        }
    )


def test_week_of_counts_seven_day_blocks_from_origin() -> None:
    stamps = pd.to_datetime(
        ["2017-01-02 00:00", "2017-01-08 23:59:59", "2017-01-09 00:00", "2017-01-01 23:00"],
        utc=True,
        format="ISO8601",
    )
    assert week_of(stamps, origin="2017-01-02").tolist() == [1, 1, 2, 0]


def test_week_of_follows_local_midnight_across_daylight_saving() -> None:
    origin = pd.Timestamp("2016-12-26", tz="America/New_York")
    # Monday 2017-03-13 00:00 in New York is 04:00 UTC (EDT), in January it was 05:00 UTC.
    stamps = pd.to_datetime(
        ["2017-01-02 04:59", "2017-01-02 05:00", "2017-03-13 03:59", "2017-03-13 04:00"],
        utc=True,
        format="ISO8601",
    )
    assert week_of(stamps, origin=origin).tolist() == [1, 2, 11, 12]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"train": (0, 40)},
        {"test": (45, 54)},
        {"train": (10, 5)},
        {"valid": (40, 44)},  # overlaps train (1, 40)
        {"train": (41, 44), "valid": (1, 40)},  # out of order
    ],
)
def test_bad_splits_are_rejected(kwargs: dict[str, tuple[int, int]]) -> None:
    with pytest.raises(ConfigError, match="split"):
        WeekSplit(**kwargs)


def test_split_uses_week_column_and_leaves_out_gaps() -> None:
    frame = events(["2017-01-01"] * 6).assign(week=[1, 40, 41, 44, 45, 53])
    frame["customer_id"] = [f"c{i}" for i in range(6)]
    parts = split_events(frame, WeekSplit(train=(1, 40), valid=(41, 43), test=(45, 52)))
    assert parts["train"]["week"].tolist() == [1, 40]
    assert parts["valid"]["week"].tolist() == [41]
    assert parts["test"]["week"].tolist() == [45]


def test_split_without_week_counts_from_first_event_day() -> None:
    frame = events(["2020-05-01 13:00", "2020-05-07 23:59", "2020-05-08 00:00", "2020-06-20"])
    parts = split_events(frame, WeekSplit(train=(1, 1), valid=(2, 2), test=(3, 53)))
    assert parts["train"]["customer_id"].tolist() == ["c0", "c1"]
    assert parts["valid"]["customer_id"].tolist() == ["c2"]
    assert parts["test"]["week"].tolist() == [8]


def test_weeks_streams_every_week_in_order_including_empty_ones() -> None:
    frame = events(["2017-01-01"] * 4).assign(week=[43, 41, 41, 44])
    frame["customer_id"] = ["a", "b", "c", "d"]
    seen = [(w, part["customer_id"].tolist()) for w, part in weeks(frame, 41, 45)]
    assert seen == [(41, ["b", "c"]), (42, []), (43, ["a"]), (44, ["d"]), (45, [])]
    with pytest.raises(ConfigError):
        list(weeks(frame, 5, 4))


@settings(max_examples=60, deadline=None)
@given(
    week_numbers=st.lists(st.integers(1, 53), min_size=1, max_size=40),
    cuts=st.lists(st.integers(1, 52), min_size=2, max_size=2, unique=True),
)
def test_split_is_a_partition_of_covered_weeks(week_numbers: list[int], cuts: list[int]) -> None:
    a, b = sorted(cuts)
    split = WeekSplit(train=(1, a), valid=(a + 1, b), test=(b + 1, 53)) if b < 53 else None
    if split is None:
        return
    frame = events(["2017-01-01"] * len(week_numbers)).assign(week=week_numbers)
    parts = split_events(frame, split)
    ids = np.concatenate([p["customer_id"].to_numpy() for p in parts.values()])
    assert sorted(ids) == sorted(frame["customer_id"])
    for name, (first, last) in split.ranges().items():
        assert parts[name]["week"].between(first, last).all()
