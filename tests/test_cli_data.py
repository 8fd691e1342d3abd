"""``fedshop data validate|import`` through the real CLI entry point: exit codes, all or nothing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from simulations import cli


@pytest.fixture(autouse=True)
def only_data_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep these tests independent of the other subcommands' imports."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("simulations.commands.data",))


def write(path: Path, *, merchant: bool = True, bad_row: int | None = None) -> Path:
    frame = pd.DataFrame(
        {
            "merchant_id": ["shop-a", "shop-a", "shop-b"],
            "household": ["h1", "h2", "h1"],
            "product_id": ["p1", "p2", "p1"],
            "timestamp": ["2017-05-01T10:00:00Z", "2017-05-02T10:00:00Z", "2017-06-01T10:00:00Z"],
            "qty": ["1", "2", "1"],
            "price": ["1.5", "0.99", "2"],
            "category": ["a", "b", "a"],
            "department": ["", "", ""],
            "brand": ["x", "y", "x"],
            "notes": ["", "", ""],
        }
    )
    if not merchant:
        frame = frame.drop(columns=["merchant_id"])
    if bad_row is not None:
        frame.loc[bad_row - 1, "qty"] = "-2"
    frame.to_csv(path, index=False)
    return path


MAP = ["--map", "household=customer_id", "--map", "qty=quantity", "--map", "notes=-"]


def test_validate_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["data", "validate", str(write(tmp_path / "e.csv")), *MAP])
    out = capsys.readouterr().out
    assert code == 0
    assert "rows:      3" in out and "merchants: 2" in out and "customers: 3" in out
    assert "2017-05-01T10:00:00+00:00" in out and "2017-06-01T10:00:00+00:00" in out


def test_validate_reports_the_bad_row_with_the_data_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "e.csv", bad_row=2)
    assert cli.main(["data", "validate", str(path), *MAP]) == 4
    err = capsys.readouterr().err
    assert "row 2" in err and "'quantity'" in err and str(path) in err


def test_validate_without_mapping_suggests_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["data", "validate", str(write(tmp_path / "e.csv"))]) == 4
    assert "missing required column 'customer_id'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--map", "qty"], 3),
        (["--max-mb", "0"], 3),
        (["--max-mb", "0.0001"], 4),
        (["--max-rows", "2"], 4),
    ],
)
def test_limits_and_bad_flags(tmp_path: Path, extra: list[str], code: int) -> None:
    assert cli.main(["data", "validate", str(write(tmp_path / "e.csv")), *MAP, *extra]) == code


def test_import_writes_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "store" / "events.parquet"
    source = write(tmp_path / "e.csv", merchant=False)
    code = cli.main(["data", "import", str(source), "--out", str(out), "--merchant-id", "m9", *MAP])
    assert code == 0 and "imported" in capsys.readouterr().out
    table = pd.read_parquet(out)
    assert len(table) == 3 and set(table["merchant_id"]) == {"m9"}


def test_failed_import_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "store" / "events.parquet"
    bad = write(tmp_path / "bad.csv", bad_row=3)
    assert cli.main(["data", "import", str(bad), "--out", str(out), *MAP]) == 4
    assert not out.parent.exists()
    good = write(tmp_path / "good.csv")
    assert cli.main(["data", "import", str(good), "--out", str(out), *MAP]) == 0
    before = out.read_bytes()
    assert cli.main(["data", "import", str(bad), "--out", str(out), *MAP]) == 4
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["events.parquet"]


def test_import_needs_out(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["data", "import", str(write(tmp_path / "e.csv"))])
    assert info.value.code == 2


def test_rows_with_an_extra_field_are_refused_not_shifted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every row one field longer than the header: refused, not read with a row index."""
    path = tmp_path / "e.csv"
    path.write_text(
        "merchant_id,customer_id,product_id,timestamp,quantity,price\n"
        "X,m1,c1,p1,2017-05-01,1,2\nX,m1,c2,p1,2017-05-01,1,2\n"
    )
    expected = f"file {path}, row 1: the row has 7 fields, the header has 6"
    assert cli.main(["data", "validate", str(path)]) == 4
    assert expected in capsys.readouterr().err
    out = tmp_path / "store" / "events.parquet"
    assert cli.main(["data", "import", str(path), "--out", str(out)]) == 4
    assert expected in capsys.readouterr().err
    assert not out.parent.exists()
