"""Damaged ledger files: whatever their bytes, reading one gives its contents or a one-line
IntegrityError/LedgerError naming the file, never another exception or a traceback."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from test_ledger_support import build_ledger, ledger_contents

from common.audit.verify import audit_ledgers
from common.errors import ExitCode, FedshopError, IntegrityError, LedgerError
from common.keys import generate_keypair, load_signing_key
from common.ledger import MerchantLedger, read_ledger_file
from simulations.cli import main as run_cli

ENTRIES = 2
LONGEST_LINE = 240  # the message, its hint and the "fedshop: error: " prefix, without the path


def _is_short(line: str, path: Path) -> bool:
    return "\n" not in line and len(line.replace(str(path), "<path>")) <= LONGEST_LINE


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merchant ledger of m1 with two entries, and m1's keys beside it."""
    root = tmp_path_factory.mktemp("pristine")
    build_ledger(root, "m1", ENTRIES)
    return root


@pytest.fixture
def ledger(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the pristine ledger (keys in ``path.parent / "keys"``)."""
    shutil.copytree(pristine, tmp_path / "copy")
    return tmp_path / "copy" / "m1.sqlite"


def _verify_cli(
    capsys: pytest.CaptureFixture[str], flag: str, path: Path, *, keys: Path
) -> tuple[int, str]:
    """Exit code and stderr of ``fedshop audit verify``; stderr must be one short line."""
    capsys.readouterr()
    code = run_cli(["audit", "verify", flag, str(path), "--keys", str(keys)])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fedshop: error: ") and _is_short(err[0], path), err[0]
    return code, err[0]


def _flip(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _record_header(path: Path, seq: int) -> int:
    """Offset of entry ``seq``'s record header. The header lists one serial type per column:
    pos (0: the rowid), merchant_id (0x11: text of 2 bytes), seq (0x09: the constant 1, or
    0x01: one byte), release_json (2 bytes), prev_hash and entry_hash (0x81 0x0d: text of 64
    bytes), signature (0x82 0x0d: text of 128 bytes); then "m1" starts the payload."""
    data = path.read_bytes()
    tail = b"\x81\x0d\x81\x0d\x82\x0dm1" + (b"" if seq == 1 else bytes([seq])) + b"{"
    end = data.index(tail)
    start = end - 6
    assert data[start : start + 3] == b"\x0c\x00\x11" and data[start + 3] == (
        0x09 if seq == 1 else 0x01
    )
    return start


def test_a_blob_merchant_id_behind_a_stale_index_is_named(
    ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One bit turns entry 1's merchant_id into a BLOB; the UNIQUE index still holds text,
    so reading through the index would see a well-typed row."""
    _flip(ledger, _record_header(ledger, 1) + 2, 0x01)  # 0x11 -> 0x10: a BLOB of 2 bytes
    with pytest.raises(IntegrityError, match=r"entry 1 in storage order: .*merchant_id is a BLOB"):
        read_ledger_file(ledger)
    code, line = _verify_cli(capsys, "--ledger", ledger, keys=ledger.parent / "keys")
    assert code == ExitCode.INTEGRITY and str(ledger) in line


def test_a_null_column_is_named(ledger: Path) -> None:
    """prev_hash read as NULL and entry_hash as 128 bytes of text: same payload, bad types."""
    header = _record_header(ledger, 2)
    data = bytearray(ledger.read_bytes())
    data[header + 6 : header + 10] = b"\x80\x00\x82\x0d"  # NULL (2-byte varint), text of 128
    ledger.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"damaged \(NULL value in entries\.prev_hash\)"):
        read_ledger_file(ledger)


def _merchant_id_key_offset(path: Path) -> int:
    """Offset of the serial type of meta's key "merchant_id" (0x23: text of 11 bytes); the
    record header is 0x03 0x23 0x11, then the payload "merchant_id" "m1"."""
    data = path.read_bytes()
    at = data.index(b"merchant_idm1") - 2
    assert data[at - 1 : at + 2] == b"\x03\x23\x11"
    return at


@pytest.mark.parametrize("flag", ["--ledger", "--server-ledger"])
def test_a_blob_meta_key_is_corruption_wherever_the_file_is_passed(
    ledger: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    _flip(ledger, _merchant_id_key_offset(ledger), 0x01)  # text -> BLOB
    code, line = _verify_cli(capsys, flag, ledger, keys=ledger.parent / "keys")
    assert code == ExitCode.INTEGRITY, line
    assert f"ledger {ledger}: meta table holds a row of non-text values (a BLOB, text)" in line


def test_an_empty_file_is_one_short_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keys").mkdir()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    code, line = _verify_cli(capsys, "--ledger", empty, keys=tmp_path / "keys")
    assert code == ExitCode.INTEGRITY
    assert line.startswith(f"fedshop: error: {empty} is not a fedshop ledger: the file is empty")
    no_tables = tmp_path / "bare.sqlite"
    sqlite3.connect(no_tables).execute("PRAGMA user_version = 1").connection.close()
    with pytest.raises(
        IntegrityError,
        match=r"bare\.sqlite is not a fedshop ledger: the SQLite file holds no tables",
    ):
        read_ledger_file(no_tables)


def test_a_directory_is_not_a_ledger_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keys").mkdir()
    folder = tmp_path / "ledgers"
    folder.mkdir()
    code, line = _verify_cli(capsys, "--ledger", folder, keys=tmp_path / "keys")
    assert code == ExitCode.LEDGER
    assert f"ledger file {folder} is a directory, not a ledger file" in line
    key, _ = generate_keypair(tmp_path / "own", name="m1")
    with pytest.raises(LedgerError, match="is a directory"):
        MerchantLedger.open(folder, merchant_id="m1", signing_key=load_signing_key(key))


def _edit(path: Path, *statements: str, params: tuple[Any, ...] = ()) -> None:
    """Inserts need no trigger dropped; the ledger's triggers refuse only UPDATE and DELETE."""
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement, params if "?" in statement else ())
    conn.commit()
    conn.close()


_COPY_ENTRY = (
    "INSERT INTO entries (merchant_id, seq, release_json, prev_hash, entry_hash, signature) "
    "SELECT {merchant_id}, {seq}, {release_json}, prev_hash, entry_hash, {signature} "
    "FROM entries WHERE seq = 1"
)
_COLUMNS = {"merchant_id": "merchant_id", "release_json": "release_json", "signature": "signature"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq": "'three'"}, r"entry 3 in storage order: seq 'three' is not an integer"),
        ({"seq": "3.5"}, r"entry 3 in storage order: seq 3\.5 is not an integer"),
        ({"merchant_id": "CAST('m1' AS BLOB)"}, r"entry 3 .*\(merchant_id is a BLOB\)"),
        ({"release_json": "x'7b7d'"}, r"merchant 'm1' seq 3: .*\(release_json is a BLOB\)"),
        ({"signature": "zeroblob(64)"}, r"merchant 'm1' seq 3: .*\(signature is a BLOB\)"),
    ],
)
def test_a_wrongly_typed_entry_column_is_named(
    ledger: Path, change: dict[str, str], message: str
) -> None:
    values = {**_COLUMNS, "seq": "3", **change}
    _edit(ledger, _COPY_ENTRY.format(**values))
    with pytest.raises(IntegrityError, match=f"ledger {re.escape(str(ledger))}: {message}"):
        read_ledger_file(ledger)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ((b"note", "x"), r"meta table holds a row of non-text values \(a BLOB, text\)"),
        ((None, "x"), r"meta table holds a row of non-text values \(NULL, text\)"),
        (("note", b"x"), r"meta table holds a row of non-text values \(text, a BLOB\)"),
        (("note", "x"), r"meta table does not fit a merchant ledger \(unknown key 'note'\)"),
    ],
)
def test_a_malformed_meta_row_is_named(ledger: Path, row: tuple[Any, ...], message: str) -> None:
    _edit(ledger, "INSERT INTO meta (key, value) VALUES (?, ?)", params=row)
    with pytest.raises(IntegrityError, match=f"ledger {re.escape(str(ledger))}: {message}"):
        read_ledger_file(ledger)


@pytest.mark.parametrize(
    ("statements", "message"),
    [
        (
            ("DROP TRIGGER meta_no_update", "DROP TRIGGER meta_no_delete", "DROP TABLE meta"),
            r"missing meta, meta_no_delete, meta_no_update, sqlite_autoindex_meta_1\)",
        ),
        (("ALTER TABLE entries ADD COLUMN note TEXT",), r"changed entries\)"),
        (("ALTER TABLE entries DROP COLUMN signature",), r"changed entries\)"),
        (("CREATE INDEX by_seq ON entries (seq)",), r"unexpected 'by_seq'\)"),
    ],
)
def test_a_missing_or_changed_table_or_column_is_named(
    ledger: Path, statements: tuple[str, ...], message: str
) -> None:
    _edit(ledger, *statements)
    with pytest.raises(
        IntegrityError,
        match=f"ledger {re.escape(str(ledger))}: schema differs from a fedshop ledger .*{message}",
    ):
        read_ledger_file(ledger)


def test_text_that_is_not_utf8_gives_a_short_line(ledger: Path) -> None:
    """SQLite quotes the whole undecodable value; the message keeps one short line."""
    _edit(
        ledger,
        _COPY_ENTRY.format(
            **{**_COLUMNS, "seq": "3", "release_json": "CAST(release_json || x'ff' AS TEXT)"}
        ),
    )
    with pytest.raises(IntegrityError) as caught:
        read_ledger_file(ledger)
    line = caught.value.one_line()
    assert str(ledger) in line and "UTF-8" in line and _is_short(line, ledger)


def test_every_byte_flipped_reads_intact_or_fails_with_a_ledger_error(
    pristine: Path, tmp_path: Path
) -> None:
    """Every byte of the file, one bit each (bit ``offset % 8``; about 20,000 audits). An
    audit that passes must have read the pristine contents: a flip in free space, in an
    index (never read), or in the rowid ``pos`` (storage order only) changes none."""
    shutil.copytree(pristine, tmp_path / "copy")
    path = tmp_path / "copy" / "m1.sqlite"
    original = path.read_bytes()
    intact = ledger_contents(path)
    keys = tmp_path / "copy" / "keys"
    wrong: list[str] = []
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, byte in enumerate(original):
            os.pwrite(fd, bytes([byte ^ (1 << offset % 8)]), offset)
            outcome = _audit_outcome(path, keys, intact)
            if outcome is not None:
                wrong.append(f"offset {offset}: {outcome}")
            os.pwrite(fd, bytes([byte]), offset)
    finally:
        os.close(fd)
    assert not wrong, f"{len(wrong)} flips misreported, e.g. {wrong[:5]}"


def _audit_outcome(path: Path, keys: Path, intact: object) -> str | None:
    """What is wrong with auditing ``path`` as it now is, or None."""
    try:
        result = audit_ledgers([path], keys_dir=keys)
    except (IntegrityError, LedgerError) as exc:
        line = exc.one_line()
        if str(path) not in line or not _is_short(line, path):
            return f"message does not name the file on one short line: {line!r}"
        return None
    except FedshopError as exc:
        return f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"
    except Exception as exc:  # any other exception is what this test looks for
        return f"{type(exc).__name__}: {exc}"
    if result.problem is not None:
        return None if result.problem.file == str(path) else f"blames {result.problem.file}"
    return None if ledger_contents(path) == intact else "verified, but the contents changed"
