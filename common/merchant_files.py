"""A data scientist's own event files as one table of merchants, for a simulation.

``PATH`` is one file with a ``merchant_id`` column, or a folder holding one file per
merchant (the file name, without its suffix, is the merchant id where the file has no
``merchant_id`` column). Every file goes through :func:`common.events.read_events`, the
same validation as ``fedshop data import``; the first problem in any file stops the load
with an error naming the file, row and column, before anything is written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataValidationError
from common.events import (
    DEFAULT_MAX_BYTES,
    LABEL,
    MERCHANT_ID,
    SORT_COLUMNS,
    EventFormat,
    event_format,
    read_events,
)
from common.keys import NAME_PATTERN

log = logging.getLogger(__name__)

NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class MerchantFiles:
    """Validated events of every merchant, and the file each merchant's events came from."""

    events: pd.DataFrame
    sources: Mapping[str, str]


def merchant_id_from_name(path: Path) -> str:
    """``shop-17.csv.gz`` -> ``shop-17``."""
    suffix = event_format(path).value
    return path.name[: -len(suffix)]


def event_files(folder: Path) -> list[Path]:
    """The event files of ``folder`` in name order; hidden files are skipped, anything else
    that is not an event file is an error (a stray file is more likely a mistake)."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file():
            raise DataValidationError(
                "not an event file (a folder of one file per merchant holds files only)",
                file=str(entry),
            )
        event_format(entry)
        files.append(entry)
    if not files:
        accepted = ", ".join(f.value for f in EventFormat)
        raise DataValidationError(
            f"the folder holds no event files (one file per merchant: {accepted})",
            file=str(folder),
        )
    return files


def _check_column_ids(frame: pd.DataFrame, *, source: str) -> None:
    ids = pd.unique(frame[MERCHANT_ID])
    bad = [merchant for merchant in ids if not NAME_PATTERN.fullmatch(merchant)]
    if bad:
        raise DataValidationError(
            f"merchant id {bad[0]!r} is not a valid merchant name ({NAME_RULE})",
            file=source,
            column=MERCHANT_ID,
        )


def _id_from_name(path: Path) -> str:
    merchant = merchant_id_from_name(path)
    if not NAME_PATTERN.fullmatch(merchant):
        raise DataValidationError(
            f"the file has no merchant_id column and its name gives merchant id {merchant!r}, "
            f"which is not a valid merchant name ({NAME_RULE}); rename the file or add the column",
            file=str(path),
        )
    return merchant


def _header(path: Path) -> list[str] | None:
    """The file's column names, or None where the header cannot be read (reading the whole
    file then reports why)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if event_format(path) is EventFormat.PARQUET:
            return list(pq.read_schema(path).names)
        header = pd.read_csv(path, nrows=0, dtype=str, encoding="utf-8-sig")
        return [str(name).strip() for name in header.columns]
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, pa.ArrowException):
        return None


def _read_one(
    path: Path, *, mapping: Mapping[str, str] | None, max_bytes: int, in_folder: bool
) -> pd.DataFrame:
    """One file's events; in a folder, a file without a merchant_id column is named after
    its merchant."""
    header = _header(path) if in_folder else None
    renamed = {(mapping or {}).get(name, name) for name in header or ()}
    default = _id_from_name(path) if header is not None and MERCHANT_ID not in renamed else None
    frame = read_events(path, mapping=mapping, max_bytes=max_bytes, default_merchant_id=default)
    if default is None:
        _check_column_ids(frame, source=str(path))
    return frame


def read_merchant_files(
    path: str | Path,
    *,
    mapping: Mapping[str, str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> MerchantFiles:
    """All merchants' validated events from ``path`` (a file or a folder, see the module)."""
    root = Path(path)
    if not root.exists():
        raise DataValidationError("no such file or folder", file=str(root))
    folder = root.is_dir()
    files = event_files(root) if folder else [root]
    frames: list[pd.DataFrame] = []
    sources: dict[str, str] = {}
    for file in files:
        frame = _read_one(file, mapping=mapping, max_bytes=max_bytes, in_folder=folder)
        for merchant in sorted(set(frame[MERCHANT_ID])):
            if merchant in sources:
                raise DataValidationError(
                    f"merchant {merchant!r} also has events in {sources[merchant]}; "
                    "keep each merchant's events in one file",
                    file=str(file),
                )
            sources[merchant] = str(file)
        frames.append(frame)
    _check_same_label_column(frames, files)
    events = pd.concat(frames, ignore_index=True)
    events = events.sort_values(list(SORT_COLUMNS), kind="stable").reset_index(drop=True)
    return MerchantFiles(events, sources)


def _check_same_label_column(frames: list[pd.DataFrame], files: list[Path]) -> None:
    with_label = [LABEL in frame.columns for frame in frames]
    if any(with_label) and not all(with_label):
        has = files[with_label.index(True)]
        lacks = files[with_label.index(False)]
        raise DataValidationError(
            f"no {LABEL!r} column, but {has} has one; give every file a label or none",
            file=str(lacks),
        )


def select_merchants(events: pd.DataFrame, *, top_n: int, min_rows: int) -> pd.DataFrame:
    """The ``top_n`` merchants with most events among those with at least ``min_rows``
    (ties: the smaller id first). Fewer qualifying merchants than ``top_n`` is fine; none is
    an error that lists the largest merchants."""
    counts = events[MERCHANT_ID].value_counts().rename("events").reset_index()
    ranking = counts.sort_values(["events", MERCHANT_ID], ascending=[False, True], kind="stable")
    qualified = ranking[ranking["events"] >= min_rows]
    if qualified.empty:
        largest = ", ".join(
            f"{m} ({n:,})" for m, n in ranking.head(5).itertuples(index=False, name=None)
        )
        raise ConfigError(
            f"no merchant has at least {min_rows:,} events (data.min_rows); the largest: "
            f"{largest}; lower it with --set data.min_rows=N"
        )
    chosen = list(qualified[MERCHANT_ID].iloc[:top_n])
    left_out = len(ranking) - len(chosen)
    if left_out:
        log.info(
            "%d of %d merchants take part (data.top_n = %d, data.min_rows = %d)",
            len(chosen),
            len(ranking),
            top_n,
            min_rows,
        )
    selected = events[np.isin(events[MERCHANT_ID].to_numpy(), chosen)]
    return selected.reset_index(drop=True)
