"""Temporal splits of event tables by week number.

Models are trained on the past and judged on the future: a random split would let a model
see a customer's later purchases while predicting earlier ones. Weeks are counted from an
origin (week 1 is ``[origin, origin + 7 days)``), in the origin's time zone so that weeks
stay aligned to local midnight across daylight-saving changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataValidationError
from common.events import TIMESTAMP

WEEK = "week"
MAX_WEEK = 53
PARTS: tuple[str, ...] = ("train", "valid", "test")


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


def week_of(timestamps: pd.Series | pd.DatetimeIndex, *, origin: pd.Timestamp | str) -> np.ndarray:
    """Week numbers (int64) of ``timestamps``; week 1 starts at ``origin`` (naive = UTC).

    Timestamps before the origin get week 0 or below; callers decide what that means.
    """
    stamps = pd.DatetimeIndex(timestamps)
    if stamps.tz is None:
        stamps = stamps.tz_localize("UTC")
    start = _as_timestamp(origin)
    local = stamps.tz_convert(start.tz).tz_localize(None)
    elapsed = (local - start.tz_localize(None)).to_numpy()
    return (elapsed // np.timedelta64(7, "D")).astype("int64") + 1


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
    frame: pd.DataFrame, split: WeekSplit, *, origin: pd.Timestamp | str | None = None
) -> dict[str, pd.DataFrame]:
    """``{"train", "valid", "test"}`` frames by week; events outside every range are left out."""
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
