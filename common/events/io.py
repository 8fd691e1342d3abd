"""Event files in and out: CSV (.csv, .csv.gz) and Parquet readers with size limits, the
atomic Parquet writer, and ``import`` (validate everything, then write, all or nothing)."""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from common.atomic import atomic_write_bytes
from common.errors import ConfigError, DataValidationError
from common.events.schema import (
    DEFAULT_BOUNDS,
    DEFAULT_MAX_BYTES,
    MERCHANT_ID,
    REQUIRED_COLUMNS,
    TIMESTAMP,
    TIMESTAMP_DTYPE,
    EventFormat,
    EventSummary,
    TimeBounds,
    summarize,
)
from common.events.validate import apply_mapping, validate_events


@dataclass(frozen=True)
class ImportReport:
    """The result of :func:`import_events`: where the validated table went and what it holds."""

    source: str
    destination: str
    bytes_written: int
    summary: EventSummary


def event_format(path: Path) -> EventFormat:
    """The format of ``path`` from its suffix; anything else is a clear error."""
    name = path.name.lower()
    for fmt in sorted(EventFormat, key=lambda f: -len(f.value)):
        if name.endswith(fmt.value):
            return fmt
    accepted = ", ".join(f.value for f in EventFormat)
    raise DataValidationError(f"unsupported file type (accepted: {accepted})", file=str(path))


def _checked_size(path: Path, max_bytes: int) -> int:
    if max_bytes <= 0:
        raise ConfigError(f"max_bytes must be > 0, got {max_bytes}")
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataValidationError("the file does not exist", file=str(path)) from None
    except OSError as exc:
        raise DataValidationError(f"cannot read the file: {exc.strerror}", file=str(path)) from None
    if not path.is_file():
        raise DataValidationError("not a regular file", file=str(path))
    if info.st_size > max_bytes:
        raise DataValidationError(
            f"the file is {info.st_size:,} bytes, more than the limit of {max_bytes:,} bytes "
            "(raise it with --max-mb)",
            file=str(path),
        )
    return info.st_size


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _LimitedReader(io.RawIOBase):
    """Stops reading past ``limit`` bytes, so a small .csv.gz cannot inflate without bound."""

    def __init__(self, inner: _Readable, *, limit: int, source: str) -> None:
        super().__init__()
        self._inner = inner
        self._limit = limit
        self._count = 0
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        self._count += len(data)
        if self._count > self._limit:
            raise DataValidationError(
                f"the decompressed data is more than the limit of {self._limit:,} bytes "
                "(raise it with --max-mb)",
                file=self._source,
            )
        buffer[: len(data)] = data
        return len(data)


@contextmanager
def _csv_bytes(path: Path, fmt: EventFormat, *, max_bytes: int) -> Iterator[io.BufferedReader]:
    """The file's bytes (decompressed for .csv.gz), never more than ``max_bytes`` of them."""
    opener = gzip.open if fmt is EventFormat.CSV_GZ else open
    with opener(path, "rb") as inner:
        yield io.BufferedReader(_LimitedReader(inner, limit=max_bytes, source=str(path)))


def _read_csv(
    path: Path, fmt: EventFormat, *, max_bytes: int, max_rows: int | None
) -> pd.DataFrame:
    """The file's cells as text, header line as column names.

    The header is read as a row of its own (``header=None``), so that a data row with more
    fields than the header is a parse error rather than a row index pandas infers silently.
    Shorter rows are padded with ``""`` by the parser; where that may have happened (an empty
    cell in the last column), the records are counted again to find them.
    """
    source = str(path)
    failure: str | None = None
    try:
        with _csv_bytes(path, fmt, max_bytes=max_bytes) as stream:
            cells = pd.read_csv(
                stream,
                header=None,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                encoding="utf-8-sig",
                nrows=None if max_rows is None else max_rows + 2,
            )
    except pd.errors.EmptyDataError:
        raise DataValidationError("the file is empty (no header line)", file=source) from None
    except pd.errors.ParserError as exc:
        failure = f"not a valid CSV file: {exc}"
    except UnicodeDecodeError:
        failure = "not UTF-8 text; save the file as UTF-8"
    except (OSError, EOFError) as exc:
        raise DataValidationError(f"cannot read the file: {exc}", file=source) from None
    if failure is not None:
        _check_records(path, fmt, max_bytes=max_bytes, find_bytes=True)
        raise DataValidationError(failure, file=source)
    # an empty header name becomes "Unnamed: i", as pandas names it when it reads a header
    header = [name or f"Unnamed: {i}" for i, name in enumerate(cells.iloc[0].tolist())]
    frame = cells.iloc[1:].reset_index(drop=True)
    frame.columns = pd.Index(header, dtype=object)
    padded = np.flatnonzero((frame.iloc[:, -1] == "").to_numpy(dtype=bool))
    if padded.size:
        _check_records(path, fmt, max_bytes=max_bytes, last_row=int(padded[-1]) + 1)
    return frame


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _check_records(
    path: Path,
    fmt: EventFormat,
    *,
    max_bytes: int,
    find_bytes: bool = False,
    last_row: int | None = None,
) -> None:
    """Raise for the first record whose number of fields differs from the header's (or, with
    ``find_bytes``, that holds a byte that is not UTF-8); stop after data row ``last_row``.

    Rows are counted as everywhere else: data rows from 1, header and blank lines excluded.
    """
    source = str(path)
    errors = "surrogateescape" if find_bytes else "strict"
    try:
        with _csv_bytes(path, fmt, max_bytes=max_bytes) as stream:
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors=errors, newline="")
            _scan_records(text, source=source, find_bytes=find_bytes, last_row=last_row)
    except (OSError, EOFError, UnicodeDecodeError):
        return  # the caller reports the failure it met itself


def _scan_records(
    text: io.TextIOWrapper, *, source: str, find_bytes: bool, last_row: int | None
) -> None:
    reader = csv.reader(text)
    header: list[str] | None = None
    row = 0
    while last_row is None or row < last_row:
        first_line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataValidationError(
                f"not a valid CSV file: {exc}", file=source, row=row + 1 if header else None
            ) from None
        if not fields or (len(fields) == 1 and not fields[0].strip(" \t")):
            continue  # a blank line, skipped by the reader of the table too
        if find_bytes:
            _check_bytes(fields, first_line, source=source, row=row + 1, header=header)
        if header is None:
            header = fields
            continue
        row += 1
        if len(fields) != len(header):
            raise DataValidationError(
                f"the row has {len(fields)} fields, the header has {len(header)}",
                file=source,
                row=row,
            )


def _check_bytes(
    fields: list[str], first_line: int, *, source: str, row: int | None, header: list[str] | None
) -> None:
    """Raise if a field holds a byte that is not UTF-8 (decoded as a lone surrogate)."""
    for index, field in enumerate(fields):
        found = _ESCAPED_BYTE.search(field)
        if found is None:
            continue
        line = first_line + sum(f.count("\n") for f in fields[:index])
        line += field[: found.start()].count("\n")
        byte = ord(found.group()) - 0xDC00
        where = f"byte 0x{byte:02x} on line {line} of the file"
        if header is None:
            raise DataValidationError(
                f"the header line is not UTF-8 text ({where}); save the file as UTF-8",
                file=source,
            )
        column = header[index].strip() if index < len(header) else None
        raise DataValidationError(
            f"not UTF-8 text ({where}); save the file as UTF-8",
            file=source,
            row=row,
            column=column,
        )


def _read_parquet(path: Path, *, max_rows: int | None) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = str(path)
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
        if max_rows is not None and rows > max_rows:
            raise DataValidationError(
                f"{rows:,} data rows, more than the --max-rows limit of {max_rows:,}",
                file=source,
                row=max_rows + 1,
            )
        return pd.read_parquet(path)
    except (OSError, ValueError, TypeError, pa.ArrowException) as exc:
        raise DataValidationError(f"not a readable Parquet file: {exc}", file=source) from None


def read_events(
    path: str | Path,
    *,
    mapping: Mapping[str, str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rows: int | None = None,
    merchant_id: str | None = None,
    default_merchant_id: str | None = None,
    extra_columns: Sequence[str] = (),
    bounds: TimeBounds = DEFAULT_BOUNDS,
) -> pd.DataFrame:
    """Read a CSV (.csv, .csv.gz) or Parquet file into a validated canonical frame.

    The size is checked before reading; ``merchant_id`` fills that column for a file
    that has none (a file that has one keeps it, and then passing one is an error);
    ``default_merchant_id`` fills it only where the file has none.
    """
    path = Path(path)
    fmt = event_format(path)
    _checked_size(path, max_bytes)
    if fmt is EventFormat.PARQUET:
        raw = _read_parquet(path, max_rows=max_rows)
    else:
        raw = _read_csv(path, fmt, max_bytes=max_bytes, max_rows=max_rows)
    raw = apply_mapping(raw, mapping, source=str(path))
    if merchant_id is not None:
        raw = _with_merchant(raw, merchant_id, source=str(path))
    elif default_merchant_id is not None and MERCHANT_ID not in raw.columns:
        raw = _with_merchant(raw, default_merchant_id, source=str(path))
    return validate_events(
        raw, source=str(path), max_rows=max_rows, extra_columns=extra_columns, bounds=bounds
    )


def _with_merchant(frame: pd.DataFrame, merchant_id: str, *, source: str) -> pd.DataFrame:
    if not merchant_id.strip():
        raise ConfigError("--merchant-id must not be empty")
    if MERCHANT_ID in frame.columns:
        raise DataValidationError(
            "the file has its own merchant_id column; drop --merchant-id or map the column away",
            file=source,
            column=MERCHANT_ID,
        )
    out = frame.copy()
    out.insert(0, MERCHANT_ID, merchant_id.strip())
    return out


def _check_writable(frame: pd.DataFrame, path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataValidationError(f"not a canonical event frame: missing {missing}", file=str(path))
    if str(frame[TIMESTAMP].dtype) != TIMESTAMP_DTYPE:
        raise DataValidationError(
            f"not a canonical event frame: timestamp dtype is {frame[TIMESTAMP].dtype}",
            file=str(path),
            column=TIMESTAMP,
        )
    if event_format(path) is not EventFormat.PARQUET:
        raise DataValidationError("event tables are written as .parquet", file=str(path))


def write_events(frame: pd.DataFrame, path: str | Path) -> int:
    """Write a canonical frame as Parquet atomically (temp file + rename); returns bytes."""
    path = Path(path)
    _check_writable(frame, path)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())
    return path.stat().st_size


def import_events(
    source: str | Path,
    destination: str | Path,
    *,
    mapping: Mapping[str, str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rows: int | None = None,
    merchant_id: str | None = None,
) -> ImportReport:
    """Validate ``source`` completely, then write it to ``destination``; all or nothing."""
    source, destination = Path(source), Path(destination)
    if event_format(destination) is not EventFormat.PARQUET:
        raise ConfigError(f"destination {destination} must end in .parquet")
    if destination.resolve() == source.resolve():
        raise ConfigError(f"destination {destination} is the source file")
    frame = read_events(
        source, mapping=mapping, max_bytes=max_bytes, max_rows=max_rows, merchant_id=merchant_id
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    size = write_events(frame, destination)
    return ImportReport(str(source), str(destination), size, summarize(frame))
