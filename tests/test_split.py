"""Temporal splits: week numbering, split validation, partitions and weekly streaming."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import RunConfig
from common.errors import ConfigError
from common.split import (
    SplitRule,
    TimeSplit,
    WeekSplit,
    parse_slice_range,
    split_by_dates,
    split_by_span,
    split_by_weeks,
    split_events,
    stream_range,
    week_of,
    weeks,
)


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


# --------------------------------------------------------------------------- TimeSplit

NEW_YORK_ORIGIN = pd.Timestamp("2016-12-26", tz="America/New_York")


def _stamps(seconds: list[int]) -> pd.Series:
    return pd.Series(pd.Timestamp("2016-12-20", tz="UTC") + pd.to_timedelta(seconds, unit="s"))


@settings(max_examples=60, deadline=None)
@given(
    seconds=st.lists(st.integers(0, 400 * 86400), min_size=1, max_size=40),
    slice_days=st.integers(1, 30),
    train_last=st.integers(1, 45),
)
def test_slices_partition_time_and_start_at_the_end_of_training(
    seconds: list[int], slice_days: int, train_last: int
) -> None:
    weeks = WeekSplit(train=(1, train_last), valid=(train_last + 1, train_last + 2), test=(50, 53))
    split = split_by_weeks(weeks, origin=NEW_YORK_ORIGIN, slice_days=slice_days)
    stamps = _stamps(seconds)
    numbers = split.slice_numbers(stamps)
    for stamp, number in zip(stamps, numbers, strict=True):
        piece = split.time_slice(int(number))
        assert piece.start <= stamp < piece.end
    first = split.time_slice(split.first_held_out_slice())
    assert first.start == split.train.end  # no held-out slice holds training time


def test_weekly_slices_of_a_week_split_are_the_weeks() -> None:
    split = split_by_weeks(WeekSplit(), origin=NEW_YORK_ORIGIN)
    held_out = split.held_out_slices(last_event=pd.Timestamp("2017-12-31", tz="UTC"))
    assert [s.number for s in held_out] == list(range(41, 54))
    stamps = pd.Series(pd.date_range("2017-01-01", "2017-12-31", freq="7h", tz="UTC"))
    assert (split.slice_numbers(stamps) == week_of(stamps, origin=NEW_YORK_ORIGIN)).all()


def test_a_week_split_gives_the_same_parts_as_the_week_column() -> None:
    frame = events(["2017-01-02 05:00", "2017-10-02 03:59", "2017-10-02 04:00", "2017-11-07"])
    frame["week"] = week_of(frame["timestamp"], origin=NEW_YORK_ORIGIN)
    weeks = WeekSplit()
    by_column = split_events(frame, weeks)
    by_time = split_by_weeks(weeks, origin=NEW_YORK_ORIGIN).split(frame)
    for name in ("train", "valid", "test"):
        assert by_time[name]["customer_id"].tolist() == by_column[name]["customer_id"].tolist()


def test_span_split_cuts_the_last_fractions_of_the_whole_span() -> None:
    first, last = pd.Timestamp("2020-01-01", tz="UTC"), pd.Timestamp("2020-04-10", tz="UTC")
    split = split_by_span(first_event=first, last_event=last, valid_fraction=0.1, test_fraction=0.2)
    assert split.rule is SplitRule.SPAN
    assert split.test.start == pd.Timestamp("2020-03-21", tz="UTC")  # 100 days: last 20
    assert split.train.end == pd.Timestamp("2020-03-11", tz="UTC")  # then 10
    assert split.test.end is None and split.train.start is None
    with pytest.raises(ConfigError, match="one moment"):
        split_by_span(first_event=first, last_event=first, valid_fraction=0.1, test_fraction=0.1)
    with pytest.raises(ConfigError, match="too short"):
        split_by_span(
            first_event=first,
            last_event=first + pd.Timedelta(seconds=1),
            valid_fraction=0.1,
            test_fraction=0.1,
        )


@pytest.mark.parametrize("rule", list(SplitRule))
def test_split_round_trips_through_its_dict(rule: SplitRule) -> None:
    first, last = pd.Timestamp("2017-01-01 08:00", tz="UTC"), pd.Timestamp("2017-12-31", tz="UTC")
    split = {
        SplitRule.WEEKS: lambda: split_by_weeks(WeekSplit(), origin=NEW_YORK_ORIGIN, slice_days=3),
        SplitRule.DATES: lambda: split_by_dates(
            train_until=pd.Timestamp("2017-09-01", tz="UTC"),
            valid_until=pd.Timestamp("2017-10-01", tz="UTC"),
            first_event=first,
        ),
        SplitRule.SPAN: lambda: split_by_span(
            first_event=first, last_event=last, valid_fraction=0.1, test_fraction=0.1
        ),
    }[rule]()
    again = TimeSplit.from_dict(json.loads(json.dumps(split.to_dict())))
    assert again == split and again.origin.tz == split.origin.tz


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train_until": "2017-09-01"}, "go together"),
        ({"train_until": "2017-09-01", "valid_until": "2017-08-01"}, "must be before"),
        ({"train_until": "soon", "valid_until": "2017-08-01"}, "ISO 8601"),
        ({"valid_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
        ({"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\)"),
        ({"slice_days": 0}, "slice_days"),
        ({"source": "files"}, "needs data.path"),
        ({"path": "x.csv"}, "for data.source = files"),
        ({"source": "files", "path": "x.csv", "mapping": ["qty"]}, "data.mapping"),
    ],
)
def test_data_config_refuses_bad_split_and_source_settings(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"data": overrides})


@pytest.mark.parametrize(("text", "expected"), [("", None), ("41-53", (41, 53)), ("7-7", (7, 7))])
def test_slice_ranges_parse(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_slice_range(text) == expected


@pytest.mark.parametrize("text", ["41", "a-b", "9-3", "0-4", "1-2-3"])
def test_bad_slice_ranges_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--online"):
        parse_slice_range(text)


def test_stream_range_stays_in_the_held_out_time() -> None:
    split = split_by_weeks(WeekSplit(), origin=NEW_YORK_ORIGIN)
    last = pd.Timestamp("2017-12-31", tz="UTC")
    assert stream_range(split, None, last_event=last) == (41, 53)
    assert stream_range(split, (45, 50), last_event=last) == (45, 50)
    with pytest.raises(ConfigError, match="holds training events"):
        stream_range(split, (40, 50), last_event=last)
    with pytest.raises(ConfigError, match="past the data"):
        stream_range(split, (45, 54), last_event=last)
