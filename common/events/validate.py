"""Validation into the canonical event table: the single gate every event file goes through.

:func:`validate_events` converts what it can, and otherwise raises
:class:`~common.errors.DataValidationError` naming the file, the first offending data row and
the column, so a merchant can fix the file without guessing.

Row numbers in errors are 1-based data rows as a person counts them in the file, header
excluded: row 1 is the first line after the CSV header (line 2 of the file) or the first
row of a Parquet file. Naive timestamps (without a UTC offset) are taken as UTC.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataValidationError
from common.events.schema import (
    ATTRIBUTE_COLUMNS,
    BRAND,
    CATEGORY,
    CORE_COLUMNS,
    CUSTOMER_ID,
    DEFAULT_BOUNDS,
    DEPARTMENT,
    DROP,
    KEY_COLUMNS,
    KNOWN_COLUMNS,
    LABEL,
    MERCHANT_ID,
    PRICE,
    PRODUCT_ID,
    QUANTITY,
    SORT_COLUMNS,
    TIMESTAMP,
    TIMESTAMP_DTYPE,
    TimeBounds,
)

_BOOLS = (bool, np.bool_)

# --------------------------------------------------------------------------- column checks


@dataclass(frozen=True)
class _Checked:
    """One converted column and the mask of rows that failed, with what was expected."""

    values: pd.Series
    bad: np.ndarray
    expected: str


def _is_texty(series: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(series.dtype) or series.dtype == object


def _slow_text(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Mixed object columns, cell by cell: text and integers pass, anything else is bad."""
    values = series.to_numpy(dtype=object)
    missing = pd.isna(values)
    is_text = np.fromiter((isinstance(v, str) for v in values), dtype=bool, count=len(values))
    is_int = np.fromiter(
        (isinstance(v, int | np.integer) and not isinstance(v, _BOOLS) for v in values),
        dtype=bool,
        count=len(values),
    )
    pieces = zip(values, is_text, is_int, strict=True)
    text = pd.Series([v if t else (str(int(v)) if i else "") for v, t, i in pieces], dtype="str")
    return text, ~(is_text | is_int | missing)


def _text_values(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Text values (missing becomes '') and a mask of cells of the wrong type."""
    n = len(series)
    series = series.reset_index(drop=True)
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(object)
    if pd.api.types.is_integer_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series):
        return series.astype("str"), np.zeros(n, dtype=bool)
    if _is_texty(series):
        if pd.api.types.infer_dtype(series, skipna=True) in ("string", "empty"):
            return series.fillna("").astype("str"), np.zeros(n, dtype=bool)
        return _slow_text(series)
    # booleans, floats, datetimes and anything else are a type error for text columns
    return pd.Series([""] * n, dtype="str"), np.ones(n, dtype=bool)


def _text_column(series: pd.Series, *, id_column: bool) -> _Checked:
    """Ids must be non-empty text or integers; descriptive text may be missing ('')."""
    expected = "a non-empty text or integer id" if id_column else "text (or empty)"
    values, bad = _text_values(series)
    values = values.str.strip()
    if id_column:
        bad = bad | (values.to_numpy() == "")
    return _Checked(values, bad, expected)


def _floats(values: Any) -> pd.Series:
    """Float64 values, NaN where not a number; ``-0`` becomes ``0`` (adding +0.0 does that),
    so that "0" and "-0" give the same table."""
    numbers = pd.Series(pd.to_numeric(values, errors="coerce"))
    return pd.Series(numbers.to_numpy(dtype="float64", na_value=np.nan) + 0.0)


def _numeric(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Float values and a mask of cells that are not numbers at all."""
    n = len(series)
    series = series.reset_index(drop=True)
    if pd.api.types.is_bool_dtype(series.dtype):
        return pd.Series(np.full(n, np.nan)), np.ones(n, dtype=bool)
    if pd.api.types.is_numeric_dtype(series.dtype):
        return _floats(series), np.zeros(n, dtype=bool)
    if not _is_texty(series):
        return pd.Series(np.full(n, np.nan)), np.ones(n, dtype=bool)
    if pd.api.types.infer_dtype(series, skipna=True) in ("string", "empty"):
        return _floats(series.astype("str").str.strip()), np.zeros(n, dtype=bool)
    values = series.to_numpy(dtype=object)
    is_bool = np.fromiter((isinstance(v, _BOOLS) for v in values), dtype=bool, count=n)
    pairs = zip(values, is_bool, strict=True)
    cleaned = [v.strip() if isinstance(v, str) else (None if b else v) for v, b in pairs]
    return _floats(pd.Series(cleaned, dtype=object)), is_bool


def _number_column(series: pd.Series, *, strictly_positive: bool) -> _Checked:
    numbers, wrong_type = _numeric(series)
    arr = numbers.to_numpy()
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(arr) & ((arr > 0) if strictly_positive else (arr >= 0))
    expected = "a finite number > 0" if strictly_positive else "a finite number >= 0"
    return _Checked(numbers, wrong_type | ~ok, expected)


def _label_column(series: pd.Series) -> _Checked:
    numbers, wrong_type = _numeric(series)
    arr = numbers.to_numpy()
    ok = (arr == 0.0) | (arr == 1.0)
    return _Checked(numbers, wrong_type | ~ok, "0 or 1")


def _parse_times(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """UTC timestamps (NaT where unparseable) and a mask of cells of the wrong type."""
    n = len(series)
    series = series.reset_index(drop=True)
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC"), np.zeros(n, dtype=bool)
    if pd.api.types.is_datetime64_dtype(series.dtype):
        return series.dt.tz_localize("UTC"), np.zeros(n, dtype=bool)
    if not _is_texty(series):
        return pd.Series(pd.NaT, index=range(n), dtype=TIMESTAMP_DTYPE), np.ones(n, dtype=bool)
    if pd.api.types.infer_dtype(series, skipna=True) in ("string", "empty"):
        text = series.astype("str").str.strip()
        return _to_utc(text), np.zeros(n, dtype=bool)
    values = series.to_numpy(dtype=object)
    usable = np.fromiter((isinstance(v, str | datetime) for v in values), dtype=bool, count=n)
    pairs = zip(values, usable, strict=True)
    cleaned = [(v.strip() if isinstance(v, str) else v) if u else None for v, u in pairs]
    return _to_utc(pd.Series(cleaned, dtype=object)), ~usable


def _to_utc(values: pd.Series) -> pd.Series:
    parsed = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
    return pd.Series(parsed).reset_index(drop=True)


def _timestamp_column(series: pd.Series, bounds: TimeBounds) -> _Checked:
    expected = f"an ISO 8601 timestamp in {bounds.describe()} (naive times are UTC)"
    parsed, wrong = _parse_times(series)
    in_range = (parsed >= bounds.earliest) & (parsed < bounds.latest)
    bad = wrong | ~in_range.fillna(False).to_numpy(dtype=bool)
    parsed = parsed.where(~pd.Series(bad), pd.NaT).astype(TIMESTAMP_DTYPE)
    return _Checked(parsed, bad, expected)


# --------------------------------------------------------------------------- frame checks


def _suggest(name: str, candidates: Sequence[str]) -> str | None:
    lowered = {c.lower(): c for c in candidates}
    if name.strip().lower() in lowered:
        return lowered[name.strip().lower()]
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[match[0]] if match else None


def _check_columns(columns: list[str], *, source: str, extra_columns: Sequence[str]) -> None:
    """Reject duplicate, missing and unknown columns, suggesting the closest known names."""
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise DataValidationError(f"column {name!r} appears twice", file=source, column=name)
        seen.add(name)
    allowed = set(KNOWN_COLUMNS) | set(extra_columns)
    unknown = [c for c in columns if c not in allowed]
    missing = [c for c in CORE_COLUMNS if c not in seen]
    if missing:
        name = missing[0]
        hint = _suggest(name, unknown)
        detail = (
            f"; the file has {hint!r}: did you mean {name!r}? (map it with --map {hint}={name})"
            if hint
            else f" (the file has: {', '.join(map(repr, columns)) or 'no columns'})"
        )
        if name == MERCHANT_ID and not hint:
            detail += (
                f"; map a column to it (--map store={MERCHANT_ID}), name the merchant with "
                "--merchant-id (data import), or give a folder with one file per merchant, "
                "named after it (simulate --data FOLDER)"
            )
        raise DataValidationError(
            f"missing required column {name!r}{detail}", file=source, column=name
        )
    if unknown:
        notes = []
        for name in unknown:
            hint = _suggest(name, [c for c in KNOWN_COLUMNS if c not in seen])
            notes.append(f"{name!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
        raise DataValidationError(
            f"unknown column(s) {', '.join(notes)}; map each to a field or drop it "
            f"(--map {unknown[0]}={DROP})",
            file=source,
            column=unknown[0],
        )


def _cell_repr(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_bad_cell(
    raw: pd.DataFrame, checked: Mapping[str, _Checked]
) -> tuple[int, str, str] | None:
    """(row index, column, message) of the first bad cell; columns break ties in order."""
    best: tuple[int, int, str] | None = None
    for order, (column, result) in enumerate(checked.items()):
        hits = np.flatnonzero(result.bad)
        if hits.size and (best is None or (int(hits[0]), order) < best[:2]):
            best = (int(hits[0]), order, column)
    if best is None:
        return None
    row, _, column = best
    got = _cell_repr(raw[column].iloc[row])
    return row, column, f"expected {checked[column].expected}, got {got}"


def _first_duplicate(keys: pd.DataFrame, usable: np.ndarray) -> tuple[int, int] | None:
    """(earlier row, later row) of the first repeated key among rows whose key cells are valid."""
    dup = keys.duplicated(keep="first").to_numpy() & usable
    hits = np.flatnonzero(dup)
    if not hits.size:
        return None
    later = int(hits[0])
    same = (keys == keys.iloc[later]).all(axis=1).to_numpy() & usable
    return int(np.flatnonzero(same)[0]), later


def validate_events(
    frame: pd.DataFrame,
    *,
    source: str,
    max_rows: int | None = None,
    extra_columns: Sequence[str] = (),
    bounds: TimeBounds = DEFAULT_BOUNDS,
) -> pd.DataFrame:
    """A new canonical event frame, or :class:`DataValidationError` for the first bad row.

    Absent attribute columns (category, department, brand) become ``""`` in the table.
    ``extra_columns`` names non-schema columns the caller knows about (e.g. ``"week"`` from
    the Complete Journey adapter); they are passed through unchanged.
    """
    clash = [c for c in extra_columns if c in KNOWN_COLUMNS]
    if clash:
        raise ConfigError(f"extra_columns {clash} are schema columns, not extras")
    raw = frame.copy(deep=False)
    raw.columns = [str(c).strip() for c in raw.columns]
    _check_columns(list(raw.columns), source=source, extra_columns=extra_columns)
    raw = raw.reset_index(drop=True)
    if len(raw) == 0:
        raise DataValidationError("the file has no data rows", file=source)
    if max_rows is not None and len(raw) > max_rows:
        raise DataValidationError(
            f"more than {max_rows:,} data rows (the --max-rows limit)",
            file=source,
            row=max_rows + 1,
        )
    checked = _check_cells(raw, bounds)
    _raise_first_problem(raw, checked, source)
    out = pd.DataFrame({name: result.values for name, result in checked.items()})
    for position, name in enumerate(ATTRIBUTE_COLUMNS, start=len(CORE_COLUMNS)):
        if name not in out.columns:
            out.insert(position, name, pd.Series([""] * len(out), dtype="str"))
    for name in extra_columns:
        if name in raw.columns:
            out[name] = raw[name].to_numpy()
    return out.sort_values(list(SORT_COLUMNS), kind="stable").reset_index(drop=True)


def _check_cells(raw: pd.DataFrame, bounds: TimeBounds) -> dict[str, _Checked]:
    checkers: dict[str, Callable[[pd.Series], _Checked]] = {
        MERCHANT_ID: lambda s: _text_column(s, id_column=True),
        CUSTOMER_ID: lambda s: _text_column(s, id_column=True),
        PRODUCT_ID: lambda s: _text_column(s, id_column=True),
        TIMESTAMP: lambda s: _timestamp_column(s, bounds),
        QUANTITY: lambda s: _number_column(s, strictly_positive=True),
        PRICE: lambda s: _number_column(s, strictly_positive=False),
        CATEGORY: lambda s: _text_column(s, id_column=False),
        DEPARTMENT: lambda s: _text_column(s, id_column=False),
        BRAND: lambda s: _text_column(s, id_column=False),
        LABEL: _label_column,
    }
    return {name: check(raw[name]) for name, check in checkers.items() if name in raw.columns}


def _raise_first_problem(raw: pd.DataFrame, checked: Mapping[str, _Checked], source: str) -> None:
    """Raise for whichever comes first in the file: a bad cell or a repeated key."""
    cell = _first_bad_cell(raw, checked)
    keys = pd.DataFrame({name: checked[name].values for name in KEY_COLUMNS})
    usable = ~np.logical_or.reduce([checked[name].bad for name in KEY_COLUMNS])
    duplicate = _first_duplicate(keys, usable)
    if duplicate is not None and (cell is None or duplicate[1] < cell[0]):
        earlier, later = duplicate
        key = tuple(str(v) for v in keys.iloc[later])
        raise DataValidationError(
            f"duplicate key {KEY_COLUMNS} = {key}: rows {earlier + 1} and {later + 1} "
            "(aggregate repeated purchases into one row)",
            file=source,
            row=later + 1,
        )
    if cell is not None:
        row, column, message = cell
        raise DataValidationError(message, file=source, row=row + 1, column=column)


# --------------------------------------------------------------------------- files


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """``["qty=quantity", "notes=-"]`` -> ``{"qty": "quantity", "notes": "-"}``."""
    mapping: dict[str, str] = {}
    for item in items:
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ConfigError(f"--map {item!r}: expected SRC=FIELD, e.g. --map qty=quantity")
        if source.strip() in mapping:
            raise ConfigError(f"--map: column {source.strip()!r} is mapped twice")
        mapping[source.strip()] = target.strip()
    return mapping


def apply_mapping(
    frame: pd.DataFrame, mapping: Mapping[str, str] | None, *, source: str
) -> pd.DataFrame:
    """Rename source columns to schema fields (``DROP`` removes a column)."""
    if not mapping:
        return frame
    targets = [t for t in mapping.values() if t != DROP]
    for src, target in mapping.items():
        if target != DROP and target not in KNOWN_COLUMNS:
            hint = _suggest(target, KNOWN_COLUMNS)
            extra = (
                f"; did you mean {hint!r}?" if hint else f" (fields: {', '.join(KNOWN_COLUMNS)})"
            )
            raise ConfigError(f"mapping {src}={target}: {target!r} is not a schema field{extra}")
        if targets.count(target) > 1:
            raise ConfigError(f"mapping: more than one column is mapped to {target!r}")
    columns = [str(c).strip() for c in frame.columns]
    absent = [src for src in mapping if src not in columns]
    if absent:
        raise DataValidationError(
            f"mapped column(s) {', '.join(map(repr, absent))} not in the file "
            f"(it has: {', '.join(map(repr, columns))})",
            file=source,
            column=absent[0],
        )
    for target in targets:
        if target in columns and mapping.get(target, target) == target:
            raise DataValidationError(
                f"the file already has a column {target!r} and the mapping renames another to it",
                file=source,
                column=target,
            )
    renamed = frame.copy(deep=False)
    renamed.columns = columns
    dropped = [src for src, t in mapping.items() if t == DROP]
    return renamed.drop(columns=dropped).rename(
        columns={s: t for s, t in mapping.items() if t != DROP}
    )
