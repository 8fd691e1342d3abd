"""The merchant event schema: conversion, errors that name the first bad row, safe file IO."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import ConfigError, DataValidationError, ExitCode
from common.events import (
    ATTRIBUTE_COLUMNS,
    CORE_COLUMNS,
    DROP,
    KEY_COLUMNS,
    REQUIRED_COLUMNS,
    TIMESTAMP_DTYPE,
    TimeBounds,
    import_events,
    read_events,
    summarize,
    validate_events,
    write_events,
)


def raw_frame(n: int = 4) -> pd.DataFrame:
    """A valid file-like frame: everything as text, as a CSV reader would give it."""
    return pd.DataFrame(
        {
            "merchant_id": ["shop-a"] * n,
            "customer_id": [f"c{i % 2}" for i in range(n)],
            "product_id": [f"p{i}" for i in range(n)],
            "timestamp": [f"2017-03-0{i + 1}T10:00:00" for i in range(n)],
            "quantity": ["1"] * n,
            "price": ["2.50"] * n,
            "category": ["dairy"] * n,
            "department": [""] * n,
            "brand": ["acme"] * n,
        }
    )


def error_of(frame: pd.DataFrame, **kwargs: object) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        validate_events(frame, source="events.csv", **kwargs)  # type: ignore[arg-type]
    return info.value


def test_valid_frame_becomes_canonical() -> None:
    raw = raw_frame()
    raw.loc[0, "customer_id"] = "  c0  "
    raw.loc[1, "timestamp"] = "2017-03-02T11:00:00+01:00"
    out = validate_events(raw.iloc[::-1], source="x")
    assert list(out.columns) == list(REQUIRED_COLUMNS)
    assert str(out["timestamp"].dtype) == TIMESTAMP_DTYPE
    assert out["quantity"].dtype == np.float64 and out["price"].dtype == np.float64
    assert out["customer_id"].tolist() == ["c0", "c1", "c0", "c1"]  # stripped, sorted by time
    assert out["timestamp"].iloc[1] == pd.Timestamp("2017-03-02T10:00:00", tz="UTC")
    assert out["timestamp"].iloc[0] == pd.Timestamp("2017-03-01T10:00:00", tz="UTC")  # naive = UTC
    assert out["price"].tolist() == [2.5] * 4
    assert raw.loc[0, "customer_id"] == "  c0  "  # the input is not modified


def test_integer_ids_and_missing_text_are_accepted() -> None:
    raw = raw_frame(2)
    raw["product_id"] = [101, 102]
    raw["brand"] = [None, "acme"]
    out = validate_events(raw, source="x")
    assert out["product_id"].tolist() == ["101", "102"]
    assert out["brand"].tolist() == ["", "acme"]


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("quantity", "0", "> 0"),
        ("quantity", "-3", "> 0"),
        ("quantity", "nan", "> 0"),
        ("quantity", "inf", "> 0"),
        ("quantity", "two", "> 0"),
        ("quantity", "-0", "> 0"),
        ("price", "-0.01", ">= 0"),
        ("price", "", ">= 0"),
        ("timestamp", "yesterday", "ISO 8601"),
        ("timestamp", "1989-12-31T23:59:59", "ISO 8601"),
        ("timestamp", "2100-01-01T00:00:00", "ISO 8601"),
        ("customer_id", "", "non-empty"),
        ("merchant_id", "   ", "non-empty"),
    ],
)
def test_bad_cell_names_row_column_and_expectation(column: str, value: str, expected: str) -> None:
    raw = raw_frame()
    raw.loc[2, column] = value
    error = error_of(raw)
    assert (error.row, error.column) == (3, column)
    assert expected in str(error) and repr(value) in str(error)
    assert "events.csv" in str(error)
    assert error.exit_code is ExitCode.DATA


def test_minus_zero_price_is_zero() -> None:
    """A price of -0 is >= 0 (the documented rule) and is stored as 0, like a price of 0."""
    raw = raw_frame()
    raw.loc[1, "price"] = "-0"
    raw.loc[2, "price"] = "-0.0"
    out = validate_events(raw, source="x")
    assert out["price"].tolist() == [2.5, 0.0, 0.0, 2.5]
    assert not np.signbit(out["price"]).any()
    zeros = raw_frame().assign(price=["2.50", "0", "0", "2.50"])
    pd.testing.assert_frame_equal(out, validate_events(zeros, source="x"))
    native = validate_events(raw_frame().assign(price=[2.5, -0.0, 0.0, 2.5]), source="x")
    assert not np.signbit(native["price"]).any()


def test_first_offending_row_wins_across_columns() -> None:
    raw = raw_frame()
    raw.loc[3, "quantity"] = "-1"
    raw.loc[1, "price"] = "-1"
    error = error_of(raw)
    assert (error.row, error.column) == (2, "price")


def test_duplicate_key_names_both_rows() -> None:
    raw = pd.concat([raw_frame(), raw_frame().iloc[[1]]], ignore_index=True)
    raw.loc[4, "timestamp"] = "2017-03-02T11:00:00+01:00"  # same instant, other notation
    error = error_of(raw)
    assert error.row == 5
    assert "rows 2 and 5" in str(error)


def test_labels_must_be_binary() -> None:
    raw = raw_frame().assign(label=["0", "1", "1", "0.5"])
    error = error_of(raw)
    assert (error.row, error.column) == (4, "label")
    ok = validate_events(raw_frame().assign(label=[0, 1, 1, 0]), source="x")
    assert ok["label"].dtype == np.float64


def test_wrong_column_types_are_rejected() -> None:
    raw = raw_frame()
    raw["product_id"] = [1.0, 2.0, 3.0, 4.0]
    assert error_of(raw).column == "product_id"
    raw = raw_frame()
    raw["quantity"] = [True, True, False, True]
    assert error_of(raw).column == "quantity"
    raw = raw_frame()
    raw["timestamp"] = [1_490_000_000] * 4  # epoch numbers are ambiguous: refuse
    assert error_of(raw).column == "timestamp"


def test_missing_and_misnamed_columns_suggest_the_field() -> None:
    error = error_of(raw_frame().rename(columns={"quantity": "quantitty"}))
    assert error.column == "quantity"
    assert "did you mean 'quantity'" in str(error)
    error = error_of(raw_frame().drop(columns=["price"]))
    assert error.column == "price" and "missing required column 'price'" in str(error)


@given(absent=st.sets(st.sampled_from(ATTRIBUTE_COLUMNS)))
def test_absent_attribute_columns_read_as_empty(absent: set[str]) -> None:
    """category, department and brand may be left out of a file: the table has them as ''."""
    blank = raw_frame().assign(**{name: "" for name in absent})
    expected = validate_events(blank, source="x")
    out = validate_events(raw_frame().drop(columns=sorted(absent)), source="x")
    assert list(out.columns) == list(REQUIRED_COLUMNS)
    pd.testing.assert_frame_equal(out, expected)


def test_unknown_columns_are_listed() -> None:
    error = error_of(raw_frame().assign(notes="x", Price_EUR="1"))
    assert "'notes'" in str(error) and "'Price_EUR'" in str(error)
    assert f"notes={DROP}" in str(error)


def test_extra_columns_pass_only_when_declared() -> None:
    raw = raw_frame().assign(week=[9, 9, 9, 9])
    assert error_of(raw).column == "week"
    out = validate_events(raw, source="x", extra_columns=("week",))
    assert out["week"].tolist() == [9, 9, 9, 9]
    with pytest.raises(ConfigError):
        validate_events(raw_frame(), source="x", extra_columns=("price",))


def test_empty_and_too_many_rows() -> None:
    assert "no data rows" in str(error_of(raw_frame().iloc[:0]))
    error = error_of(raw_frame(), max_rows=3)
    assert error.row == 4 and "3" in str(error)


def test_bounds_are_configurable() -> None:
    bounds = TimeBounds(earliest=pd.Timestamp("2017-03-02"), latest=pd.Timestamp("2018-01-01"))
    error = error_of(raw_frame(), bounds=bounds)
    assert (error.row, error.column) == (1, "timestamp")
    with pytest.raises(ConfigError):
        TimeBounds(earliest=pd.Timestamp("2020-01-01"), latest=pd.Timestamp("2019-01-01"))


def test_summary_counts() -> None:
    summary = summarize(validate_events(raw_frame(), source="x"))
    assert (summary.rows, summary.merchants, summary.customers, summary.products) == (4, 1, 2, 4)
    assert summary.first == pd.Timestamp("2017-03-01T10:00:00", tz="UTC")


# ------------------------------------------------------------------ property tests

ids = st.text(alphabet="abcXYZ019-_", min_size=1, max_size=5)


@st.composite
def canonical_frames(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(1, 8))
    seconds = draw(st.lists(st.integers(0, 10**8), min_size=n, max_size=n, unique=True))
    frame = pd.DataFrame(
        {
            "merchant_id": draw(st.lists(ids, min_size=n, max_size=n)),
            "customer_id": draw(st.lists(ids, min_size=n, max_size=n)),
            "product_id": draw(st.lists(ids, min_size=n, max_size=n)),
            "timestamp": pd.Timestamp("2000-01-01", tz="UTC") + pd.to_timedelta(seconds, "s"),
            "quantity": draw(
                st.lists(st.floats(0.001, 1e6, allow_nan=False), min_size=n, max_size=n)
            ),
            "price": draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=n, max_size=n)),
            "category": draw(st.lists(st.text("ab c", max_size=3), min_size=n, max_size=n)),
            "department": draw(st.lists(st.text("xy", max_size=3), min_size=n, max_size=n)),
            "brand": draw(st.lists(st.text("B1", max_size=3), min_size=n, max_size=n)),
        }
    )
    if draw(st.booleans()):
        frame["label"] = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    return frame


CORRUPTIONS = [
    "drop",
    "rename",
    "nan",
    "negative",
    "bad_timestamp",
    "duplicate",
    "empty",
    "empty_id",
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=canonical_frames(), kind=st.sampled_from(CORRUPTIONS), data=st.data())
def test_any_corruption_raises_a_data_error_naming_the_place(
    frame: pd.DataFrame, kind: str, data: st.DataObject
) -> None:
    raw = frame.assign(timestamp=frame["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    raw = raw.astype({"quantity": object, "price": object})
    row = data.draw(st.integers(0, len(raw) - 1))
    expected_row: int | None = row + 1
    if kind in ("drop", "rename"):
        column = data.draw(st.sampled_from(CORE_COLUMNS))
        if kind == "drop":
            raw = raw.drop(columns=[column])
        else:
            raw = raw.rename(columns={column: column.upper() + "_"})
        expected_row = None
    elif kind in ("nan", "negative"):
        column = data.draw(st.sampled_from(["quantity", "price"]))
        raw.loc[row, column] = float("nan") if kind == "nan" else -1.0
    elif kind == "bad_timestamp":
        column = "timestamp"
        raw.loc[row, column] = data.draw(st.sampled_from(["2017-13-01", "noon", "", "1900-01-01"]))
    elif kind == "empty_id":
        column = data.draw(st.sampled_from(["merchant_id", "customer_id", "product_id"]))
        raw.loc[row, column] = " "
    elif kind == "duplicate":
        raw = pd.concat([raw, raw.iloc[[row]]], ignore_index=True)
        column, expected_row = "", len(raw)
    else:
        raw, column, expected_row = raw.iloc[:0], "", None
    with pytest.raises(DataValidationError) as info:
        validate_events(raw, source="f.csv")
    error = info.value
    assert error.row == expected_row
    if kind == "duplicate":
        assert f"rows {row + 1} and {len(raw)}" in str(error)
    elif kind == "empty":
        assert "no data rows" in str(error)
    else:
        assert error.column == column and repr(column) in str(error)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=canonical_frames())
def test_csv_and_parquet_round_trips_are_identical(frame: pd.DataFrame) -> None:
    expected = validate_events(frame, source="memory")
    with tempfile.TemporaryDirectory() as tmp:
        csv, parquet = Path(tmp) / "e.csv", Path(tmp) / "e.parquet"
        frame.to_csv(csv, index=False)
        write_events(expected, parquet)
        from_csv = read_events(csv)
        from_parquet = read_events(parquet)
    pd.testing.assert_frame_equal(from_csv, expected)
    pd.testing.assert_frame_equal(from_parquet, expected)
    assert not expected.duplicated(list(KEY_COLUMNS)).any()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=canonical_frames(), suffix=st.sampled_from([".csv", ".csv.gz"]), data=st.data())
def test_rows_with_a_wrong_number_of_fields_are_refused(
    frame: pd.DataFrame, suffix: str, data: st.DataObject
) -> None:
    """Any data row with more or fewer fields than the header is refused, naming the first."""
    lines = frame.to_csv(index=False).splitlines()
    assert '"' not in "".join(lines)  # no quoting: a row is a line and fields split on ","
    width = len(lines[0].split(","))
    bad_rows = data.draw(st.sets(st.integers(1, len(lines) - 1), min_size=1, max_size=3))
    for row in bad_rows:
        fields = lines[row].split(",")
        change = data.draw(st.sampled_from(["prepend", "append", "cut"]))
        if change == "cut":  # merchant_id is never empty, so the line never becomes blank
            fields = fields[: -data.draw(st.integers(1, width - 1))]
        else:
            extra = data.draw(st.lists(st.sampled_from(["X", "", "7"]), min_size=1, max_size=3))
            fields = extra + fields if change == "prepend" else fields + extra
        lines[row] = ",".join(fields)
    text = "\n".join(lines) + "\n"
    first = min(bad_rows)
    count = len(lines[first].split(","))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"e{suffix}"
        if suffix == ".csv.gz":
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
        with pytest.raises(DataValidationError) as info:
            read_events(path)
    error = info.value
    assert (error.file, error.row, error.column) == (str(path), first, None)
    assert f"row {first}: the row has {count} fields, the header has {width}" in str(error)
    assert error.exit_code is ExitCode.DATA


# ------------------------------------------------------------------ files


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_read_csv_gz_and_csv_row_numbers(tmp_path: Path) -> None:
    raw = raw_frame()
    raw.loc[2, "quantity"] = "-1"
    path = tmp_path / "e.csv.gz"
    with gzip.open(path, "wt") as handle:
        raw.to_csv(handle, index=False)
    with pytest.raises(DataValidationError) as info:
        read_events(path)
    assert info.value.row == 3 and info.value.file == str(path)
    text = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert text[info.value.row].split(",")[4] == "-1"  # row N is file line N+1 (header first)


HEADER = "merchant_id,customer_id,product_id,timestamp,quantity,price\n"


@pytest.mark.parametrize(
    ("body", "row", "fields"),
    [
        ("X,m1,c1,p1,2017-05-01,1,2\nX,m1,c2,p1,2017-05-01,1,2\n", 1, 7),  # all rows one more
        ("m1,c1,p1,2017-05-01,1,2\nX,m1,c2,p1,2017-05-01,1,2\n", 2, 7),
        ("X,m1,c1,p1,2017-05-01,1,2\nm1,c2,p1,2017-05-01,1,2\n", 1, 7),
        ("m1,c1,p1,2017-05-01,1,2\nm1,c2,p1,2017-05-01,1\n", 2, 5),
        ("m1,c1,p1,2017-05-01,1,2,\nm1,c2,p1,2017-05-01,1,2\n", 1, 7),  # a trailing comma
        ("m1,c1,p1,2017-05-01,1,2\n\nm1,c2,p1,2017-05-01,1\nm1\n", 2, 5),  # blank lines skip
        ("m1,c1,p1,2017-05-01,1,2\nm1,c2,p1,2017-05-01,1,2,3,4\n", 2, 8),
        ('m1,"c\n1",p1,2017-05-01,1,2\nm1,c2,p1,2017-05-01\n', 2, 4),  # rows, not lines
    ],
)
def test_a_row_with_a_wrong_number_of_fields_is_named(
    tmp_path: Path, body: str, row: int, fields: int
) -> None:
    path = tmp_path / "e.csv"
    path.write_text(HEADER + body)
    with pytest.raises(DataValidationError) as info:
        read_events(path)
    assert str(info.value) == (
        f"file {path}, row {row}: the row has {fields} fields, the header has 6"
    )
    assert info.value.exit_code is ExitCode.DATA


def test_csv_header_names_are_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text(HEADER.replace("price", "price,price") + "m1,c1,p1,2017-05-01,1,2,2\n")
    with pytest.raises(DataValidationError, match="'price' appears twice"):
        read_events(path)
    path.write_text(HEADER.replace("\n", ",\n") + "m1,c1,p1,2017-05-01,1,2,\n")
    out = read_events(path, mapping={"Unnamed: 6": DROP})  # an unnamed column, as pandas names it
    assert out["price"].tolist() == [2.0]


@pytest.mark.parametrize(
    ("content", "expected", "line"),
    [
        (
            b"m1,c1,p1,2017-05-01,1,2\nm1,c\xff2,p1,2017-05-01,1,2\n",
            "row 2, column 'customer_id'",
            3,
        ),
        (b'm1,"c\n\n1",p1,2017-05-01,1,2\xe9\n', "row 1, column 'price'", 4),
    ],
)
def test_a_byte_that_is_not_utf8_is_located(
    tmp_path: Path, content: bytes, expected: str, line: int
) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(HEADER.encode() + content)
    with pytest.raises(DataValidationError) as info:
        read_events(path)
    message = str(info.value)
    assert f"file {path}, {expected}: not UTF-8 text" in message
    byte = "0xff" if b"\xff" in content else "0xe9"
    assert f"byte {byte} on line {line} of the file" in message  # the line that holds it
    path.write_bytes(b"merchant_\xe9id" + HEADER.encode()[11:] + b"m1,c1,p1,2017-05-01,1,2\n")
    with pytest.raises(DataValidationError, match="header line is not UTF-8") as info:
        read_events(path)
    assert info.value.row is None


def test_ids_are_text_in_csv_and_float_columns_are_refused(tmp_path: Path) -> None:
    """A CSV cell is text: "1.0" is the text id "1.0", as in a Parquet text column; only a
    column of floats (whose values lost their text) is refused."""
    path = tmp_path / "e.csv"
    path.write_text(HEADER + "m1,1.0,p1,2017-05-01,1,2\nm1,1,p1,2017-05-01,1,2\n")
    assert sorted(read_events(path)["customer_id"]) == ["1", "1.0"]
    text = raw_frame().assign(customer_id=["1.0", "1", "2", "2.0"])
    assert validate_events(text, source="x")["customer_id"].tolist() == ["1.0", "1", "2", "2.0"]
    error = error_of(raw_frame().assign(customer_id=[1.0, 1.0, 2.0, 2.0]))
    assert (error.row, error.column) == (1, "customer_id")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "events.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(DataValidationError, match=r"unsupported file type.*\.csv"):
        read_events(path)


def test_size_is_checked_before_reading(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", raw_frame())
    size = path.stat().st_size
    with pytest.raises(DataValidationError) as info:
        read_events(path, max_bytes=100)
    message = str(info.value)
    assert str(path) in message and f"{size:,} bytes" in message and "100 bytes" in message


def test_gzip_cannot_inflate_past_the_limit(tmp_path: Path) -> None:
    big = pd.concat([raw_frame()] * 2000, ignore_index=True)
    path = tmp_path / "e.csv.gz"
    with gzip.open(path, "wt") as handle:
        big.to_csv(handle, index=False)
    assert path.stat().st_size < 20_000
    with pytest.raises(DataValidationError, match="decompressed"):
        read_events(path, max_bytes=20_000)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.csv", b"", "empty"),
        ("e.parquet", b"PAR1 not really", "Parquet"),
        ("e.csv.gz", b"\x1f\x8b\x08garbage", "cannot read"),
        ("e.csv", b"merchant_id,customer_id\n\xff\xfe,x\n", "UTF-8"),
    ],
)
def test_corrupt_files_raise_data_errors(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataValidationError, match=message) as info:
        read_events(path)
    assert info.value.file == str(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="does not exist"):
        read_events(tmp_path / "nope.csv")


def test_mapping_renames_and_drops(tmp_path: Path) -> None:
    raw = raw_frame().rename(columns={"quantity": "qty", "customer_id": "household"})
    path = write_csv(tmp_path / "e.csv", raw.assign(notes="n"))
    out = read_events(path, mapping={"qty": "quantity", "household": "customer_id", "notes": DROP})
    assert out["quantity"].tolist() == [1.0] * 4 and "notes" not in out.columns
    with pytest.raises(DataValidationError, match="'basket'") as info:
        read_events(path, mapping={"basket": "quantity"})
    assert info.value.column == "basket"
    with pytest.raises(ConfigError, match="did you mean 'quantity'"):
        read_events(path, mapping={"qty": "quantty"})
    with pytest.raises(ConfigError, match="more than one"):
        read_events(path, mapping={"qty": "quantity", "notes": "quantity"})


def test_merchant_id_fills_a_missing_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", raw_frame().drop(columns=["merchant_id"]))
    out = read_events(path, merchant_id="shop-z")
    assert set(out["merchant_id"]) == {"shop-z"}
    both = write_csv(tmp_path / "f.csv", raw_frame())
    with pytest.raises(DataValidationError, match="own merchant_id"):
        read_events(both, merchant_id="shop-z")


def test_write_is_atomic_and_refuses_non_canonical(tmp_path: Path) -> None:
    frame = validate_events(raw_frame(), source="x")
    target = tmp_path / "out.parquet"
    size = write_events(frame, target)
    assert size == target.stat().st_size
    pd.testing.assert_frame_equal(pd.read_parquet(target), frame)
    with pytest.raises(DataValidationError):
        write_events(frame.drop(columns=["price"]), target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_import_is_all_or_nothing(tmp_path: Path) -> None:
    destination = tmp_path / "out" / "events.parquet"
    good = write_csv(tmp_path / "good.csv", raw_frame())
    report = import_events(good, destination)
    assert report.summary.rows == 4 and report.bytes_written == destination.stat().st_size
    before = destination.read_bytes()
    bad_frame = raw_frame()
    bad_frame.loc[3, "price"] = "free"
    bad = write_csv(tmp_path / "bad.csv", bad_frame)
    with pytest.raises(DataValidationError):
        import_events(bad, destination)
    assert destination.read_bytes() == before
    assert sorted(p.name for p in destination.parent.iterdir()) == ["events.parquet"]
    fresh = tmp_path / "never" / "events.parquet"
    with pytest.raises(DataValidationError):
        import_events(bad, fresh)
    assert not fresh.parent.exists()
    with pytest.raises(ConfigError):
        import_events(good, tmp_path / "events.csv")
