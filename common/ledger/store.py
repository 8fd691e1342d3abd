"""The SQLite file behind every ledger: append-only schema, one-pass reads, one-transaction
appends, and SQLite failures mapped to LedgerError (I/O) or IntegrityError (corruption)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Self

from common.errors import FedshopError, IntegrityError, LedgerError
from common.ledger.entry import LedgerEntry, LedgerRow

LEDGER_FORMAT = "fedshop-ledger/2"  # 2: releases record their noise source and RDP bound
BUSY_TIMEOUT_S = 10.0

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE entries (pos INTEGER PRIMARY KEY, merchant_id TEXT NOT NULL, "
    "seq INTEGER NOT NULL, release_json TEXT NOT NULL, prev_hash TEXT NOT NULL, "
    "entry_hash TEXT NOT NULL, signature TEXT NOT NULL, UNIQUE (merchant_id, seq))",
    "CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries "
    "BEGIN SELECT RAISE(ABORT, 'fedshop ledger is append-only'); END",
    "CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries "
    "BEGIN SELECT RAISE(ABORT, 'fedshop ledger is append-only'); END",
    "CREATE TRIGGER meta_no_update BEFORE UPDATE ON meta "
    "BEGIN SELECT RAISE(ABORT, 'fedshop ledger is append-only'); END",
    "CREATE TRIGGER meta_no_delete BEFORE DELETE ON meta "
    "BEGIN SELECT RAISE(ABORT, 'fedshop ledger is append-only'); END",
)
KIND_MERCHANT = "merchant"
KIND_SERVER = "server"


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    try:
        if read_only:
            uri = Path(path).absolute().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        else:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_S)
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA trusted_schema=OFF")
        return conn
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        raise _db_error(path, exc) from None


_IO_PROBLEMS = ("unable to open", "locked", "readonly", "disk i/o", "permission", "busy")


def _db_error(path: Path, exc: Exception) -> FedshopError:
    """I/O trouble is a LedgerError; anything else SQLite cannot read means corruption."""
    text = str(exc)
    if any(problem in text.lower() for problem in _IO_PROBLEMS):
        return LedgerError(f"ledger {path}: {text}")
    return IntegrityError(f"ledger {path}: {text}")


def _create(conn: sqlite3.Connection, *, kind: str, merchant_id: str | None) -> None:
    """Write the schema in one transaction, unless a concurrent opener already did."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            conn.execute("COMMIT")
            return
        for statement in _SCHEMA:
            conn.execute(statement)
        meta = {"format": LEDGER_FORMAT, "kind": kind}
        if merchant_id is not None:
            meta["merchant_id"] = merchant_id
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(meta.items()))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _schema_problem(conn: sqlite3.Connection) -> str | None:
    stored = {row[0] for row in conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")}
    if stored != set(_SCHEMA):
        extra = sorted(stored - set(_SCHEMA))
        missing = sorted(set(_SCHEMA) - stored)
        return f"schema differs from a fedshop ledger (extra {extra}, missing {missing})"
    return None


def _structure_problem(conn: sqlite3.Connection) -> str | None:
    """SQLite's own check of pages and indexes: a damaged index can hide rows from one query
    and show them to another, so a ledger is read only from a structurally sound file."""
    rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(3)").fetchall()]
    return None if rows == ["ok"] else f"the SQLite file is damaged ({'; '.join(rows)})"


@dataclass(frozen=True)
class LedgerFile:
    """Everything read from one ledger file in one pass, unverified."""

    path: Path
    kind: str
    merchant_id: str | None
    rows: tuple[LedgerRow, ...] = field(repr=False)

    def by_merchant(self) -> dict[str, list[LedgerRow]]:
        groups: dict[str, list[LedgerRow]] = {}
        for row in self.rows:
            groups.setdefault(row.merchant_id, []).append(row)
        return groups


_ROWS_QUERY = "SELECT merchant_id, seq, release_json, prev_hash, entry_hash, signature FROM entries"


def _well_typed(row: tuple[Any, ...]) -> bool:
    merchant_id, seq, release_json, prev_hash, entry_hash, signature = row
    return (
        type(merchant_id) is str
        and type(seq) is int
        and type(release_json) is str
        and type(prev_hash) is str
        and type(entry_hash) is str
        and type(signature) is str
    )


def _read_all(conn: sqlite3.Connection, path: Path) -> LedgerFile:
    problem = _schema_problem(conn) or _structure_problem(conn)
    if problem is not None:
        raise IntegrityError(f"ledger {path}: {problem}")
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") == "fedshop-ledger/1":
        raise IntegrityError(
            f"ledger {path}: format fedshop-ledger/1 records no noise source (its noise may "
            "have come from the platform's seed); only fedshop-ledger/2 ledgers are accepted"
        )
    if meta.get("format") != LEDGER_FORMAT or meta.get("kind") not in (KIND_MERCHANT, KIND_SERVER):
        raise IntegrityError(f"ledger {path}: meta table is not a {LEDGER_FORMAT} header: {meta}")
    # Storage order is cheaper to read than index order; sorting in Python gives the same
    # order as ORDER BY merchant_id, seq (UTF-8 byte order is code point order).
    raw = conn.execute(f"{_ROWS_QUERY} ORDER BY pos").fetchall()
    if not all(map(_well_typed, raw)):
        ordered = conn.execute(f"{_ROWS_QUERY} ORDER BY merchant_id, seq").fetchall()
        bad = next(row for row in ordered if not _well_typed(row))
        merchant_id, seq = bad[0], bad[1]
        if not all(type(value) is str for value in (merchant_id, *bad[2:])):
            raise IntegrityError(
                f"ledger {path}: merchant {merchant_id!r} seq {seq}: "
                "a column holds a non-text value"
            )
        raise IntegrityError(f"ledger {path}: seq {seq!r} is not an integer")
    raw.sort(key=itemgetter(0, 1))
    rows = tuple(map(LedgerRow._make, raw))
    return LedgerFile(Path(path), meta["kind"], meta.get("merchant_id"), rows)


def read_ledger_file(path: Path) -> LedgerFile:
    """Read a ledger copy read-only (auditors); IntegrityError if it is not a valid file."""
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"ledger file {path} does not exist")
    conn = _connect(path, read_only=True)
    try:
        return _read_all(conn, path)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        raise _db_error(path, exc) from None
    finally:
        conn.close()


def _insert(conn: sqlite3.Connection, path: Path, entries: Sequence[LedgerEntry]) -> None:
    """Append ``entries`` in one transaction; nothing is written if anything fails."""
    rows = [
        (e.merchant_id, e.seq, e.release.canonical_json, e.prev_hash, e.entry_hash, e.signature)
        for e in entries
    ]
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise _db_error(path, exc) from None
    try:
        conn.executemany(
            "INSERT INTO entries (merchant_id, seq, release_json, prev_hash, entry_hash, "
            "signature) VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        conn.execute("ROLLBACK")
        raise LedgerError(f"ledger {path}: append failed, nothing was written: {exc}") from None


def _open_store(
    path: Path, *, kind: str, merchant_id: str | None
) -> tuple[sqlite3.Connection, LedgerFile]:
    path = Path(path)
    if not path.parent.is_dir():
        raise LedgerError(f"ledger directory {path.parent} does not exist")
    existed = path.exists() and path.stat().st_size > 0
    conn = _connect(path, read_only=False)
    try:
        if not existed:
            _create(conn, kind=kind, merchant_id=merchant_id)
        data = _read_all(conn, path)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        conn.close()
        raise _db_error(path, exc) from None
    except BaseException:
        conn.close()
        raise
    if data.kind != kind or data.merchant_id != merchant_id:
        conn.close()
        raise LedgerError(
            f"ledger {path} is a {data.kind} ledger for {data.merchant_id!r}, "
            f"not a {kind} ledger for {merchant_id!r}"
        )
    return conn, data


class _Closable:
    _conn: sqlite3.Connection | None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError("ledger is closed")
        return self._conn

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
