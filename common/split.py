"""Temporal splits of event tables: training, validation and test periods, and slices.

Models are trained on the past and judged on the future: a random split would let a model
see a customer's later purchases while predicting earlier ones. :class:`TimeSplit` is the one
split every part of fedshop uses. It holds three ordered, disjoint periods of time and a
calendar of fixed-length slices (weekly by default) that cut the held-out time into the
steps of online streaming. It is built in one of three ways (:class:`SplitRule`):

- ``weeks``: week ranges of a calendar (Complete Journey's provider weeks, synthetic data);
- ``dates``: explicit ends of the training and validation periods;
- ``span``: the last fraction of the data's time span is the test period and the fraction
  before it validation. The span is the whole data set's (all merchants together), so that
  every merchant trains on the same past and is tested on the same future.

Weeks and slices are counted from an origin (slice 1 is ``[origin, origin + days)``), in the
origin's time zone so that they stay aligned to local midnight across daylight-saving
changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataValidationError
from common.events import TIMESTAMP

WEEK = "week"
MAX_WEEK = 53
PARTS: tuple[str, ...] = ("train", "valid", "test")
DEFAULT_SLICE_DAYS = 7


class SplitRule(Enum):
    """How the train / valid / test boundaries were chosen."""

    WEEKS = "weeks"
    DATES = "dates"
    SPAN = "span"


def check_week_ranges(
    ranges: Mapping[str, Sequence[int]], *, field: Callable[[str], str]
) -> dict[str, tuple[int, int]]:
    """Validate train, valid and test week ranges (ordered, disjoint, within 1..53); errors name
    each part as ``field(part)`` so that the caller's configuration key appears in the message."""
    checked: dict[str, tuple[int, int]] = {}
    previous_end = 0
    for name in PARTS:
        bounds = ranges[name]
        if len(bounds) != 2 or not all(isinstance(b, int | np.integer) for b in bounds):
            raise ConfigError(f"{field(name)}: expected two week numbers, got {bounds!r}")
        first, last = int(bounds[0]), int(bounds[1])
        if not 1 <= first <= last <= MAX_WEEK:
            raise ConfigError(
                f"{field(name)}: weeks ({first}, {last}) must satisfy 1 <= first <= last <= 53"
            )
        if first <= previous_end:
            raise ConfigError(
                f"{field(name)}: starts at week {first}, not after the previous part "
                f"(which ends at week {previous_end}); parts must be ordered and disjoint"
            )
        previous_end = last
        checked[name] = (first, last)
    return checked


@dataclass(frozen=True)
class WeekSplit:
    """Inclusive week ranges for training, validation (model selection) and test."""

    train: tuple[int, int] = (1, 40)
    valid: tuple[int, int] = (41, 44)
    test: tuple[int, int] = (45, 53)

    def __post_init__(self) -> None:
        checked = check_week_ranges(self.ranges(), field=lambda part: f"split.{part}")
        for name, bounds in checked.items():
            object.__setattr__(self, name, bounds)

    def ranges(self) -> dict[str, tuple[int, int]]:
        return {name: getattr(self, name) for name in PARTS}


def _as_timestamp(origin: pd.Timestamp | str) -> pd.Timestamp:
    stamp = pd.Timestamp(origin)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp


def period_of(
    timestamps: pd.Series | pd.DatetimeIndex, *, origin: pd.Timestamp | str, days: int
) -> np.ndarray:
    """Numbers (int64) of the ``days``-long periods holding ``timestamps``; period 1 starts at
    ``origin`` (naive = UTC). Days are calendar days in the origin's time zone.

    Timestamps before the origin get period 0 or below; callers decide what that means.
    """
    stamps = pd.DatetimeIndex(timestamps)
    if stamps.tz is None:
        stamps = stamps.tz_localize("UTC")
    start = _as_timestamp(origin)
    local = stamps.tz_convert(start.tz).tz_localize(None)
    elapsed = (local - start.tz_localize(None)).to_numpy()
    return (elapsed // np.timedelta64(days, "D")).astype("int64") + 1


def week_of(timestamps: pd.Series | pd.DatetimeIndex, *, origin: pd.Timestamp | str) -> np.ndarray:
    """Week numbers (int64) of ``timestamps``; week 1 starts at ``origin`` (naive = UTC)."""
    return period_of(timestamps, origin=origin, days=7)


def calendar_add(moment: pd.Timestamp, days: int) -> pd.Timestamp:
    """``moment`` plus ``days`` calendar days on the wall clock of its own time zone."""
    shifted = moment.tz_localize(None) + pd.Timedelta(days=days)
    return shifted.tz_localize(moment.tz)


def default_origin(frame: pd.DataFrame) -> pd.Timestamp:
    """UTC midnight of the day of the first event: week 1 starts there."""
    if len(frame) == 0:
        raise DataValidationError("cannot count weeks of an empty event table")
    first: pd.Timestamp = frame[TIMESTAMP].min()
    return first.tz_convert("UTC").normalize()


def with_weeks(frame: pd.DataFrame, *, origin: pd.Timestamp | str | None = None) -> pd.DataFrame:
    """``frame`` with a ``week`` column (kept if present and no origin is given)."""
    if WEEK in frame.columns and origin is None:
        return frame
    start = default_origin(frame) if origin is None else origin
    return frame.assign(**{WEEK: week_of(frame[TIMESTAMP], origin=start)})


def split_events(
    frame: pd.DataFrame,
    split: TimeSplit | WeekSplit,
    *,
    origin: pd.Timestamp | str | None = None,
) -> dict[str, pd.DataFrame]:
    """``{"train", "valid", "test"}`` frames; events outside every period are left out.

    A :class:`WeekSplit` counts weeks from the frame's ``week`` column when it has one
    (the Complete Journey adapter's provider weeks), else from ``origin``.
    """
    if isinstance(split, TimeSplit):
        return split.split(frame)
    dated = with_weeks(frame, origin=origin)
    week = dated[WEEK].to_numpy()
    parts = {}
    for name, (first, last) in split.ranges().items():
        mask = (week >= first) & (week <= last)
        parts[name] = dated.loc[mask].reset_index(drop=True)
    return parts


def weeks(
    frame: pd.DataFrame, first: int, last: int, *, origin: pd.Timestamp | str | None = None
) -> Iterator[tuple[int, pd.DataFrame]]:
    """Yield ``(week, events of that week)`` for every week first..last, empty weeks included.

    For online fine-tuning: the model sees one week at a time, in order.
    """
    if not 1 <= first <= last:
        raise ConfigError(f"weeks: need 1 <= first <= last, got first={first}, last={last}")
    dated = with_weeks(frame, origin=origin)
    week = dated[WEEK].to_numpy()
    order = np.argsort(week, kind="stable")
    sorted_weeks = week[order]
    for number in range(first, last + 1):
        lo, hi = np.searchsorted(sorted_weeks, [number, number + 1])
        yield number, dated.iloc[order[lo:hi]].reset_index(drop=True)


# --------------------------------------------------------------------------- time splits


def parse_moment(text: str, *, field: str) -> pd.Timestamp:
    """An ISO 8601 date or time as a UTC timestamp (naive = UTC), or a ConfigError naming
    ``field``."""
    try:
        stamp = pd.Timestamp(text)
    except (TypeError, ValueError):
        stamp = pd.NaT
    if pd.isna(stamp):
        raise ConfigError(
            f"{field}: expected an ISO 8601 date or time (e.g. 2017-10-01), got {text!r}"
        )
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _iso(moment: pd.Timestamp | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass(frozen=True)
class Period:
    """``[start, end)``; a missing bound is open."""

    start: pd.Timestamp | None
    end: pd.Timestamp | None
    name: str

    def __post_init__(self) -> None:
        if self.start is not None and self.end is not None and not self.start <= self.end:
            raise ConfigError(f"period {self.name}: start {self.start} is after end {self.end}")

    def mask(self, timestamps: pd.Series) -> np.ndarray:
        inside = np.ones(len(timestamps), dtype=bool)
        if self.start is not None:
            inside &= (timestamps >= self.start).to_numpy(dtype=bool)
        if self.end is not None:
            inside &= (timestamps < self.end).to_numpy(dtype=bool)
        return inside

    def describe(self) -> str:
        first = "" if self.start is None else f"{self.start:%Y-%m-%d %H:%M}"
        last = "" if self.end is None else f"{self.end:%Y-%m-%d %H:%M}"
        return f"{first}..{last}"


@dataclass(frozen=True)
class TimeSlice:
    """One step of online streaming: events in ``[start, end)``. ``number`` counts slices
    from the split's origin (for weekly slices of Complete Journey: the provider's week)."""

    number: int
    start: pd.Timestamp
    end: pd.Timestamp

    def mask(self, timestamps: pd.Series) -> np.ndarray:
        return ((timestamps >= self.start) & (timestamps < self.end)).to_numpy(dtype=bool)


@dataclass(frozen=True)
class TimeSplit:
    """Training, validation and test periods (ordered, disjoint) and the slice calendar.

    ``origin`` is where slice 1 starts; it is chosen so that the end of training is a slice
    boundary, so no slice of the held-out time holds training events.
    """

    rule: SplitRule
    train: Period
    valid: Period
    test: Period
    origin: pd.Timestamp
    slice_days: int = DEFAULT_SLICE_DAYS

    def __post_init__(self) -> None:
        if self.slice_days < 1:
            raise ConfigError(f"data.slice_days must be >= 1, got {self.slice_days}")
        if self.train.end is None or self.test.start is None:
            raise ConfigError("a split needs an end of training and a start of the test period")
        previous = self.train.end
        for part in (self.valid, self.test):
            if part.start is None or part.start < previous:
                raise ConfigError(
                    f"the {part.name} period must start at or after {previous} "
                    "(periods are ordered and disjoint)"
                )
            previous = part.end if part.end is not None else part.start
        if self.valid.end is None:
            raise ConfigError("the validation period needs an end")

    def periods(self) -> dict[str, Period]:
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def split(self, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """``{"train", "valid", "test"}`` frames; events outside every period are left out."""
        stamps = frame[TIMESTAMP]
        return {
            name: frame.loc[period.mask(stamps)].reset_index(drop=True)
            for name, period in self.periods().items()
        }

    def slice_numbers(self, timestamps: pd.Series) -> np.ndarray:
        return period_of(timestamps, origin=self.origin, days=self.slice_days)

    def time_slice(self, number: int) -> TimeSlice:
        start = calendar_add(self.origin, self.slice_days * (number - 1))
        return TimeSlice(number, start, calendar_add(start, self.slice_days))

    def first_held_out_slice(self) -> int:
        assert self.train.end is not None
        return int(self.slice_numbers(pd.Series([self.train.end]))[0])

    def held_out_slices(self, *, last_event: pd.Timestamp) -> list[TimeSlice]:
        """The slices from the end of training to the end of the test period (or to the last
        event when the test period is open), in order; for online streaming."""
        assert self.train.end is not None
        end = self.test.end if self.test.end is not None else last_event + pd.Timedelta(1, "ns")
        last = int(self.slice_numbers(pd.Series([end - pd.Timedelta(1, "ns")]))[0])
        return [self.time_slice(n) for n in range(self.first_held_out_slice(), last + 1)]

    def cohort(self) -> str:
        """The ledger cohort name of the offline training events."""
        return f"train:{self.train.name}"

    def describe(self) -> str:
        parts = ", ".join(f"{name} {p.describe()}" for name, p in self.periods().items())
        return f"{parts} (UTC; rule {self.rule.value}, slices of {self.slice_days} days)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.value,
            **{
                name: {"start": _iso(p.start), "end": _iso(p.end), "name": p.name}
                for name, p in self.periods().items()
            },
            "origin": self.origin.isoformat(),
            "origin_tz": str(self.origin.tz),
            "slice_days": self.slice_days,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TimeSplit:
        def moment(text: str | None) -> pd.Timestamp | None:
            return None if text is None else pd.Timestamp(text).tz_convert("UTC")

        periods = {
            name: Period(moment(data[name]["start"]), moment(data[name]["end"]), data[name]["name"])
            for name in PARTS
        }
        origin = pd.Timestamp(data["origin"]).tz_convert(data["origin_tz"])
        return cls(
            rule=SplitRule(data["rule"]),
            origin=origin,
            slice_days=int(data["slice_days"]),
            **periods,
        )


def _aligned_origin(
    train_end: pd.Timestamp, calendar_start: pd.Timestamp, days: int
) -> pd.Timestamp:
    """The slice origin at or before ``calendar_start`` that puts a boundary on ``train_end``."""
    start = calendar_start.tz_convert(train_end.tz)
    span_days = (train_end.tz_localize(None) - start.tz_localize(None)) / pd.Timedelta(days=1)
    return calendar_add(train_end, -days * max(1, math.ceil(span_days / days)))


def split_by_weeks(
    weeks: WeekSplit, *, origin: pd.Timestamp | str, slice_days: int = DEFAULT_SLICE_DAYS
) -> TimeSplit:
    """Week ranges of the calendar that starts at ``origin`` (week 1)."""
    start = _as_timestamp(origin)

    def period(name: str, first: int, last: int) -> Period:
        begin, end = calendar_add(start, 7 * (first - 1)), calendar_add(start, 7 * last)
        return Period(begin.tz_convert("UTC"), end.tz_convert("UTC"), f"w{first:02d}-w{last:02d}")

    parts = {name: period(name, *bounds) for name, bounds in weeks.ranges().items()}
    train_end = calendar_add(start, 7 * weeks.train[1])
    return TimeSplit(
        rule=SplitRule.WEEKS,
        origin=_aligned_origin(train_end, start, slice_days),
        slice_days=slice_days,
        **parts,
    )


def _utc_midnight(moment: pd.Timestamp) -> pd.Timestamp:
    return moment.tz_convert("UTC").normalize()


def split_by_dates(
    *,
    train_until: pd.Timestamp,
    valid_until: pd.Timestamp,
    first_event: pd.Timestamp,
    slice_days: int = DEFAULT_SLICE_DAYS,
) -> TimeSplit:
    """Training before ``train_until``, validation up to ``valid_until``, test after it."""
    if not train_until < valid_until:
        raise ConfigError(
            f"data.train_until ({train_until}) must be before data.valid_until ({valid_until})"
        )

    def name(moment: pd.Timestamp) -> str:
        return f"{moment:%Y-%m-%dT%H:%M:%SZ}"

    return TimeSplit(
        rule=SplitRule.DATES,
        train=Period(None, train_until, f"..{name(train_until)}"),
        valid=Period(train_until, valid_until, f"{name(train_until)}..{name(valid_until)}"),
        test=Period(valid_until, None, f"{name(valid_until)}.."),
        origin=_aligned_origin(train_until, _utc_midnight(first_event), slice_days),
        slice_days=slice_days,
    )


def split_by_span(
    *,
    first_event: pd.Timestamp,
    last_event: pd.Timestamp,
    valid_fraction: float,
    test_fraction: float,
    slice_days: int = DEFAULT_SLICE_DAYS,
) -> TimeSplit:
    """The last ``test_fraction`` of ``[first_event, last_event]`` is the test period, the
    ``valid_fraction`` before it validation; boundaries are cut to the second."""
    span = last_event - first_event
    if span <= pd.Timedelta(0):
        raise ConfigError(
            f"all events happen at one moment ({first_event}): a time split needs a time span"
        )
    valid_until = (last_event - span * test_fraction).floor("s")
    train_until = (valid_until - span * valid_fraction).floor("s")
    if not first_event < train_until < valid_until <= last_event:
        raise ConfigError(
            f"the data's span {first_event}..{last_event} is too short to cut "
            f"valid_fraction={valid_fraction} and test_fraction={test_fraction} at whole seconds"
        )
    dated = split_by_dates(
        train_until=train_until,
        valid_until=valid_until,
        first_event=first_event,
        slice_days=slice_days,
    )
    return TimeSplit(
        rule=SplitRule.SPAN,
        train=dated.train,
        valid=dated.valid,
        test=dated.test,
        origin=dated.origin,
        slice_days=slice_days,
    )


def parse_slice_range(text: str) -> tuple[int, int] | None:
    """``"FIRST-LAST"`` slice numbers (e.g. ``"41-53"``); ``""`` is None: every held-out
    slice. Checks the form only; :func:`stream_range` checks it against a split."""
    if not text.strip():
        return None
    try:
        first, last = (int(part) for part in text.split("-"))
    except ValueError:
        raise ConfigError(
            f"--online expects slices as FIRST-LAST (e.g. 41-53), got {text!r}"
        ) from None
    if not 1 <= first <= last:
        raise ConfigError(f"--online {text}: need 1 <= FIRST <= LAST")
    return first, last


def stream_range(
    split: TimeSplit, requested: tuple[int, int] | None, *, last_event: pd.Timestamp
) -> tuple[int, int]:
    """The slices to stream: ``requested`` if it lies in the held-out time, else an error
    that names the held-out slices; None means all of them."""
    slices = split.held_out_slices(last_event=last_event)
    low, high = slices[0].number, slices[-1].number
    if requested is None:
        return low, high
    first, last = requested
    if first < low:
        raise ConfigError(
            f"--online {first}-{last}: slice {first} holds training events "
            f"(the held-out slices are {low}-{high})"
        )
    if last > high:
        raise ConfigError(
            f"--online {first}-{last}: slice {last} is past the data "
            f"(the held-out slices are {low}-{high})"
        )
    return first, last
