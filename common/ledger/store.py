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
from common.keys import NAME_PATTERN
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
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        raise _db_error(path, exc) from None


_IO_PROBLEMS = ("unable to open", "locked", "readonly", "disk i/o", "permission", "busy")
_MESSAGE_CHARS = 100


def _cut(text: str) -> str:
    """``text`` on one line and cut short: an error names the file and what is wrong in one
    readable line, whatever a corrupted file holds."""
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_CHARS else f"{text[: _MESSAGE_CHARS - 3]}..."


def _short(value: object) -> str:
    """A stored value for a message: ``repr`` shows control characters and bytes as such."""
    return _cut(repr(value))


def _db_error(path: Path, exc: Exception) -> FedshopError:
    """I/O trouble is a LedgerError; anything else SQLite cannot read means corruption."""
    text = _cut(str(exc)) or type(exc).__name__  # SQLite quotes undecodable text whole
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


# The catalogue a ledger's sqlite_master holds, by name: (type, table, sql), sql None for the
# indexes SQLite makes for the UNIQUE and PRIMARY KEY constraints.
_CATALOGUE: dict[str, tuple[str, str, str | None]] = {
    "meta": ("table", "meta", _SCHEMA[0]),
    "sqlite_autoindex_meta_1": ("index", "meta", None),
    "entries": ("table", "entries", _SCHEMA[1]),
    "sqlite_autoindex_entries_1": ("index", "entries", None),
    "entries_no_update": ("trigger", "entries", _SCHEMA[2]),
    "entries_no_delete": ("trigger", "entries", _SCHEMA[3]),
    "meta_no_update": ("trigger", "meta", _SCHEMA[4]),
    "meta_no_delete": ("trigger", "meta", _SCHEMA[5]),
}


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """IntegrityError unless the file's catalogue is exactly a ledger's; the message says in
    a few words which objects are missing, changed or unexpected."""
    stored = conn.execute("SELECT name, type, tbl_name, sql FROM sqlite_master").fetchall()
    found = {row[0]: tuple(row[1:]) for row in stored}
    if len(found) == len(stored) and found == _CATALOGUE:
        return
    if not stored:
        empty = conn.execute("PRAGMA page_count").fetchone()[0] == 0
        reason = "the file is empty" if empty else "the SQLite file holds no tables"
        raise IntegrityError(f"{path} is not a fedshop ledger: {reason}")
    parts = []
    missing = sorted(set(_CATALOGUE) - set(found))
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    changed = sorted(n for n, v in found.items() if n in _CATALOGUE and v != _CATALOGUE[n])
    if changed:
        parts.append(f"changed {', '.join(changed)}")
    unexpected = sorted({_short(n) for n in found if n not in _CATALOGUE})
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:3])}")
    reason = "; ".join(parts) or "an object is listed twice"
    raise IntegrityError(f"ledger {path}: schema differs from a fedshop ledger ({reason})")


def _structure_problem(conn: sqlite3.Connection) -> str | None:
    """SQLite's own check of pages, records and NOT NULL constraints; its first finding, or
    None. quick_check does not compare indexes with their tables: ledgers are read from the
    tables alone (``NOT INDEXED``), so a damaged index cannot change what is read."""
    rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(1)").fetchall()]
    if rows == ["ok"]:
        return None
    lines = [line.strip() for row in rows for line in row.splitlines()]
    first = next((line for line in lines if line and not line.startswith("***")), "")
    return f"the SQLite file is damaged ({_cut(first or 'no details')})"


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


_ROWS_QUERY = (
    "SELECT merchant_id, seq, release_json, prev_hash, entry_hash, signature "
    "FROM entries NOT INDEXED ORDER BY pos"
)
_COLUMNS = LedgerRow._fields
_SQL_TYPES = {str: "text", int: "an integer", float: "a real", bytes: "a BLOB", type(None): "NULL"}


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


def _type_problem(row: tuple[Any, ...], index: int) -> str:
    """Where the first wrongly typed value of an ill-typed ``row`` is and what it holds."""
    merchant_id, seq = row[0], row[1]
    if type(merchant_id) is str and type(seq) is int:
        where = f"merchant {merchant_id!r} seq {seq}"
    else:  # the row cannot name itself: give its place in storage order
        where = f"entry {index} in storage order"
    for column, value in zip(_COLUMNS, row, strict=True):
        expected = int if column == "seq" else str
        if type(value) is not expected:
            if column == "seq":
                return f"{where}: seq {_short(value)} is not an integer"
            held = _SQL_TYPES.get(type(value), type(value).__name__)
            return f"{where}: a column holds a non-text value ({column} is {held})"
    raise AssertionError("_type_problem called on a well-typed row")


def _read_meta(conn: sqlite3.Connection, path: Path) -> tuple[str, str | None]:
    """The ledger's kind and merchant, from a header that must be exactly a ledger's: every
    key and value text, each key once, no key missing or unknown."""
    where = f"ledger {path}: meta table"
    pairs = conn.execute("SELECT key, value FROM meta NOT INDEXED").fetchall()
    for key, value in pairs:
        if type(key) is not str or type(value) is not str:
            held = ", ".join(_SQL_TYPES.get(type(v), type(v).__name__) for v in (key, value))
            raise IntegrityError(f"{where} holds a row of non-text values ({held})")
    meta = dict(pairs)
    if len(meta) != len(pairs):
        raise IntegrityError(f"{where} holds a key twice")
    if meta.get("format") == "fedshop-ledger/1":
        raise IntegrityError(
            f"ledger {path}: format fedshop-ledger/1 records no noise source (its noise may "
            "have come from the platform's seed); only fedshop-ledger/2 ledgers are accepted"
        )
    if meta.get("format") != LEDGER_FORMAT:
        raise IntegrityError(f"{where}: format {_short(meta.get('format'))}, not {LEDGER_FORMAT}")
    kind = meta.get("kind")
    if kind not in (KIND_MERCHANT, KIND_SERVER):
        raise IntegrityError(f"{where}: kind {_short(kind)} is neither merchant nor server")
    expected = {"format", "kind"} | ({"merchant_id"} if kind == KIND_MERCHANT else set())
    if set(meta) != expected:
        parts = [f"missing key {key!r}" for key in sorted(expected - set(meta))]
        parts += [f"unknown key {_short(key)}" for key in sorted(set(meta) - expected)]
        raise IntegrityError(f"{where} does not fit a {kind} ledger ({'; '.join(parts[:3])})")
    merchant_id = meta.get("merchant_id")
    if merchant_id is not None and not NAME_PATTERN.fullmatch(merchant_id):
        raise IntegrityError(f"{where}: merchant_id {_short(merchant_id)} is not a merchant name")
    return kind, merchant_id


def _read_all(conn: sqlite3.Connection, path: Path) -> LedgerFile:
    _check_schema(conn, path)
    problem = _structure_problem(conn)
    if problem is not None:
        raise IntegrityError(f"ledger {path}: {problem}")
    kind, merchant_id = _read_meta(conn, path)
    # Rows are read from the table alone, in storage order (see _structure_problem). Sorting
    # in Python gives the order of ORDER BY merchant_id, seq (UTF-8 byte order is code point
    # order), and is cheaper than reading through the index.
    raw = conn.execute(_ROWS_QUERY).fetchall()
    if not all(map(_well_typed, raw)):
        index, row = next((i, r) for i, r in enumerate(raw, start=1) if not _well_typed(r))
        raise IntegrityError(f"ledger {path}: {_type_problem(row, index)}")
    raw.sort(key=itemgetter(0, 1))
    rows = tuple(map(LedgerRow._make, raw))
    return LedgerFile(Path(path), kind, merchant_id, rows)


def _not_a_file(path: Path) -> LedgerError | None:
    if path.is_dir():
        return LedgerError(f"ledger file {path} is a directory, not a ledger file")
    if not path.exists():
        return LedgerError(f"ledger file {path} does not exist")
    if not path.is_file():
        return LedgerError(f"ledger file {path} is not a regular file")
    return None


def read_ledger_file(path: Path) -> LedgerFile:
    """Read a ledger copy read-only (auditors). Whatever the bytes, the outcome is the file's
    contents or a one-line FedshopError naming the file: IntegrityError if it is not a valid
    ledger, LedgerError if it cannot be read."""
    path = Path(path)
    problem = _not_a_file(path)
    if problem is not None:
        raise problem
    conn = _connect(path, read_only=True)
    try:
        return _read_all(conn, path)
    except (sqlite3.Error, UnicodeDecodeError) as exc:
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
    if path.is_dir():
        raise LedgerError(f"ledger file {path} is a directory, not a ledger file")
    existed = path.exists() and path.stat().st_size > 0
    conn = _connect(path, read_only=False)
    try:
        if not existed:
            _create(conn, kind=kind, merchant_id=merchant_id)
        data = _read_all(conn, path)
    except (sqlite3.Error, UnicodeDecodeError) as exc:
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
