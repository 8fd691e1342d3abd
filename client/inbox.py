"""A merchant's inbox: new event files become validated, numbered data cohorts, or quarantine.

Layout under the inbox root::

    inbox/        files dropped by the merchant's export job (.csv, .csv.gz, .parquet)
    quarantine/   rejected files, each with FILE.reason.txt saying why
    accepted/     stream-NNNNNN.parquet, one canonical event table per accepted file
    inbox.sqlite  which content (SHA-256) was processed, cohorts, event keys, deliveries

Arrival: a file is only read once it is complete. With ``ArrivalMode.STABLE`` (default) a file
is processed when its size and modification time are unchanged between two scans; with
``ArrivalMode.RENAMED`` the export job promises to write to a hidden name (``.NAME``) or one
ending in ``.part``/``.tmp`` and rename it into place, so every visible file is complete. Hidden,
``.part`` and ``.tmp`` files are never read.

Crash safety: an accepted file's cohort id is reserved in one SQLite write transaction, the
Parquet file is written (temp file, fsync, rename) inside it, and the cohort row, its event keys
and the content hash are committed together; the inbox file is removed only after the commit. A
crash before the commit leaves no cohort (the next scan redoes the work under the same id); a
crash after it leaves the inbox file, which the next scan recognises by its hash and removes.
Events already accepted in an earlier cohort (same merchant, customer, product and timestamp) are
dropped from later ones, so no event is counted twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd

from common import sqlite_store
from common.atomic import atomic_write_text
from common.errors import ConfigError, DataValidationError, IntegrityError, NotFoundError
from common.events import (
    DEFAULT_MAX_BYTES,
    KEY_COLUMNS,
    MERCHANT_ID,
    TIMESTAMP,
    read_events,
    write_events,
)

INDEX_NAME = "inbox.sqlite"
COHORT_PREFIX = "stream-"
_IGNORED_SUFFIXES = (".part", ".tmp", ".partial")
_CHUNK = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    sha256 TEXT PRIMARY KEY, status TEXT NOT NULL, name TEXT NOT NULL,
    cohort_id TEXT, reason TEXT NOT NULL, at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, sha256 TEXT NOT NULL,
    status TEXT NOT NULL, at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cohorts (
    seq INTEGER PRIMARY KEY, cohort_id TEXT UNIQUE NOT NULL, source_name TEXT NOT NULL,
    sha256 TEXT NOT NULL, parquet_sha256 TEXT NOT NULL, rows INTEGER NOT NULL,
    overlap_rows INTEGER NOT NULL, first_event TEXT NOT NULL, last_event TEXT NOT NULL,
    accepted_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS event_keys (key BLOB PRIMARY KEY, cohort_seq INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (name TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER);
"""


class ArrivalMode(Enum):
    """How the inbox knows a dropped file is complete."""

    STABLE = "stable"
    RENAMED = "renamed"


class FileStatus(Enum):
    """What happened to one delivered file."""

    ACCEPTED = "accepted"
    QUARANTINED = "quarantined"
    DUPLICATE = "duplicate"
    OVERLAP = "overlap"


@dataclass(frozen=True)
class Cohort:
    """One accepted file: a numbered, immutable slice of the merchant's event stream."""

    cohort_id: str
    seq: int
    source_name: str
    sha256: str
    rows: int
    overlap_rows: int
    first_event: str
    last_event: str
    accepted_at: str
    path: Path


@dataclass(frozen=True)
class Quarantined:
    name: str
    reason: str
    path: Path


@dataclass(frozen=True)
class ScanReport:
    """The outcome of one scan; ``waiting`` files are not yet known to be complete."""

    accepted: tuple[Cohort, ...] = ()
    quarantined: tuple[Quarantined, ...] = ()
    duplicates: tuple[str, ...] = ()
    overlaps: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def event_keys(frame: pd.DataFrame) -> list[bytes]:
    """16-byte digests of each row's unique key (merchant, customer, product, timestamp ns)."""
    stamps = frame[TIMESTAMP].astype("int64").astype(str)
    parts = [frame[c].astype(str) for c in KEY_COLUMNS if c != TIMESTAMP]
    joined = parts[0].str.cat([*parts[1:], stamps], sep="\x1f")
    return [hashlib.sha256(s.encode("utf-8")).digest()[:16] for s in joined]


def _iso(now: datetime) -> str:
    if now.tzinfo is None:
        raise ConfigError(f"scan time must be timezone-aware, got {now!r}")
    return now.isoformat()


def _no_fault(step: str) -> None:
    """Default fault hook; tests replace it to simulate a crash at ``step``."""


def read_cohort_file(path: Path, sha256: str) -> pd.DataFrame:
    """An accepted cohort's events, if the file still has the SHA-256 recorded at acceptance."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"cohort file {path} is missing") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"cohort file {path} changed since it was accepted")
    return pd.read_parquet(io.BytesIO(data))


def accepted_cohorts(root: Path) -> list[tuple[str, Path, str]]:
    """(cohort id, file, SHA-256) of each accepted cohort, oldest first, for readers in other
    processes: opens the index read-only and changes nothing (unlike :class:`Inbox`, which
    tidies up after crashes and must only run where the inbox is scanned)."""
    index = Path(root) / INDEX_NAME
    if not index.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT cohort_id, parquet_sha256 FROM cohorts ORDER BY seq").fetchall()
    accepted = Path(root) / "accepted"
    return [(str(c), accepted / f"{c}.parquet", str(h)) for c, h in rows]


class Inbox:
    """Turns dropped files into cohorts; one instance per merchant inbox directory.

    ``merchant_id``, when given, quarantines files holding any other merchant's events.
    ``reader`` replaces :func:`common.events.read_events` (it must raise DataValidationError).
    """

    def __init__(
        self,
        root: Path,
        *,
        arrival: ArrivalMode = ArrivalMode.STABLE,
        merchant_id: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        reader: Callable[[Path], pd.DataFrame] | None = None,
    ) -> None:
        self.root = Path(root)
        self.inbox_dir = self.root / "inbox"
        self.quarantine_dir = self.root / "quarantine"
        self.accepted_dir = self.root / "accepted"
        for directory in (self.inbox_dir, self.quarantine_dir, self.accepted_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / INDEX_NAME
        self.arrival = arrival
        self.merchant_id = merchant_id
        self._reader = reader or (lambda p: read_events(p, max_bytes=max_bytes))
        self._fault_hook: Callable[[str], None] = _no_fault
        with self._connect() as conn:
            conn.executescript(_SCHEMA)
        self._remove_orphans()

    # ------------------------------------------------------------------ storage

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite_store.connect(self.index_path)

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite_store.transaction(self.index_path)

    def _remove_orphans(self) -> None:
        """Delete cohort files a crash left without an index row (their id will be reused)."""
        with self._connect() as conn:
            known = {str(r[0]) for r in conn.execute("SELECT cohort_id FROM cohorts")}
        for path in self.accepted_dir.glob(f"{COHORT_PREFIX}*.parquet"):
            if path.name.removesuffix(".parquet") not in known:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ scanning

    def _candidates(self) -> list[Path]:
        return sorted(
            p
            for p in self.inbox_dir.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and not p.name.lower().endswith(_IGNORED_SUFFIXES)
        )

    def _is_ready(self, conn: sqlite3.Connection, path: Path) -> bool:
        if self.arrival is ArrivalMode.RENAMED:
            return True
        info = path.stat()
        row = conn.execute(
            "SELECT size, mtime_ns FROM seen WHERE name = ?", (path.name,)
        ).fetchone()
        if row is not None and (row[0], row[1]) == (info.st_size, info.st_mtime_ns):
            return True
        conn.execute(
            "INSERT OR REPLACE INTO seen (name, size, mtime_ns) VALUES (?,?,?)",
            (path.name, info.st_size, info.st_mtime_ns),
        )
        return False

    def scan(self, *, now: datetime) -> ScanReport:
        """Process every complete file in ``inbox/``; see the module docstring for the rules."""
        at = _iso(now)
        accepted: list[Cohort] = []
        quarantined: list[Quarantined] = []
        duplicates: list[str] = []
        overlaps: list[str] = []
        waiting: list[str] = []
        for path in self._candidates():
            try:
                with self._connect() as conn:
                    ready = self._is_ready(conn, path)
            except FileNotFoundError:  # removed or renamed by its writer since the listing
                continue
            if not ready:
                waiting.append(path.name)
                continue
            status, result = self._process(path, at)
            if status is FileStatus.ACCEPTED and isinstance(result, Cohort):
                accepted.append(result)
            elif status is FileStatus.QUARANTINED and isinstance(result, Quarantined):
                quarantined.append(result)
            elif status is FileStatus.DUPLICATE:
                duplicates.append(path.name)
            elif status is FileStatus.OVERLAP:
                overlaps.append(path.name)
            with self._connect() as conn:
                conn.execute("DELETE FROM seen WHERE name = ?", (path.name,))
        return ScanReport(
            tuple(accepted), tuple(quarantined), tuple(duplicates), tuple(overlaps), tuple(waiting)
        )

    def _process(self, path: Path, at: str) -> tuple[FileStatus | None, object]:
        sha = file_sha256(path)
        with self._connect() as conn:
            known = conn.execute(
                "SELECT status, name, reason FROM files WHERE sha256 = ?", (sha,)
            ).fetchone()
        if known is not None:
            return self._known(path, sha, FileStatus(known[0]), str(known[1]), str(known[2]), at)
        try:
            frame = self._check_merchant(self._reader(path), path)
        except DataValidationError as exc:
            return FileStatus.QUARANTINED, self._quarantine(path, sha, exc.one_line(), at)
        return self._accept(path, sha, frame, at)

    def _check_merchant(self, frame: pd.DataFrame, path: Path) -> pd.DataFrame:
        """Refuse a file that holds another merchant's events (a misrouted export)."""
        if self.merchant_id is None:
            return frame
        other = frame.index[frame[MERCHANT_ID] != self.merchant_id]
        if len(other):
            row = int(frame.index.get_loc(other[0])) + 1
            found = frame.loc[other[0], MERCHANT_ID]
            raise DataValidationError(
                f"merchant_id {found!r} but this inbox belongs to {self.merchant_id!r}",
                file=str(path),
                row=row,
                column=MERCHANT_ID,
            )
        return frame

    def _known(
        self, path: Path, sha: str, status: FileStatus, name: str, reason: str, at: str
    ) -> tuple[FileStatus | None, object]:
        """Same content again: finish a crashed step (same name) or record a duplicate."""
        redelivery = name != path.name
        if redelivery:
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO deliveries (name, sha256, status, at) VALUES (?,?,?,?)",
                    (path.name, sha, FileStatus.DUPLICATE.value, at),
                )
        if status is FileStatus.QUARANTINED:
            note = f"same content as quarantined {name}: {reason}" if redelivery else reason
            moved = self._move_to_quarantine(path, note)
            return (FileStatus.DUPLICATE if redelivery else status), Quarantined(
                path.name, note, moved
            )
        path.unlink(missing_ok=True)
        return (FileStatus.DUPLICATE if redelivery else None), None

    def _move_to_quarantine(self, path: Path, reason: str) -> Path:
        target = self.quarantine_dir / path.name
        if target.exists():
            target = self.quarantine_dir / f"{path.stem}.{file_sha256(path)[:12]}{path.suffix}"
        reason_path = target.with_name(target.name + ".reason.txt")
        atomic_write_text(reason_path, reason + "\n")
        os.replace(path, target)
        return target

    def _quarantine(self, path: Path, sha: str, reason: str, at: str) -> Quarantined:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO files (sha256, status, name, cohort_id, reason, at) "
                "VALUES (?,?,?,?,?,?)",
                (sha, FileStatus.QUARANTINED.value, path.name, None, reason, at),
            )
            conn.execute(
                "INSERT INTO deliveries (name, sha256, status, at) VALUES (?,?,?,?)",
                (path.name, sha, FileStatus.QUARANTINED.value, at),
            )
        self._fault_hook("quarantine_after_commit")
        return Quarantined(path.name, reason, self._move_to_quarantine(path, reason))

    @staticmethod
    def _overlapping_rows(conn: sqlite3.Connection, keys: list[bytes]) -> np.ndarray:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS incoming (key BLOB PRIMARY KEY, row INTEGER)")
        conn.execute("DELETE FROM incoming")
        conn.executemany(
            "INSERT INTO incoming (key, row) VALUES (?,?)",
            sorted(zip(keys, range(len(keys)), strict=True)),  # sorted: B-tree appends
        )
        rows = conn.execute("SELECT row FROM incoming JOIN event_keys USING (key)").fetchall()
        conn.execute("DELETE FROM incoming")
        return np.array(sorted(int(r[0]) for r in rows), dtype=np.int64)

    def _accept(
        self, path: Path, sha: str, frame: pd.DataFrame, at: str
    ) -> tuple[FileStatus, object]:
        keys = event_keys(frame)
        with self._transaction() as conn:
            overlap = self._overlapping_rows(conn, keys)
            keep = np.setdiff1d(np.arange(len(frame)), overlap)
            if keep.size == 0:
                self._record(conn, path.name, sha, FileStatus.OVERLAP, None, "all events known", at)
                cohort = None
            else:
                cohort = self._write_cohort(
                    conn, path.name, sha, frame.iloc[keep], overlap.size, at
                )
                conn.executemany(
                    "INSERT INTO event_keys (key, cohort_seq) VALUES (?,?)",
                    sorted((keys[i], cohort.seq) for i in keep),
                )
                self._record(conn, path.name, sha, FileStatus.ACCEPTED, cohort.cohort_id, "", at)
            self._fault_hook("before_commit")
        self._fault_hook("after_commit")
        path.unlink(missing_ok=True)
        return (FileStatus.OVERLAP, None) if cohort is None else (FileStatus.ACCEPTED, cohort)

    @staticmethod
    def _record(
        conn: sqlite3.Connection,
        name: str,
        sha: str,
        status: FileStatus,
        cohort_id: str | None,
        reason: str,
        at: str,
    ) -> None:
        conn.execute(
            "INSERT INTO files (sha256, status, name, cohort_id, reason, at) VALUES (?,?,?,?,?,?)",
            (sha, status.value, name, cohort_id, reason, at),
        )
        conn.execute(
            "INSERT INTO deliveries (name, sha256, status, at) VALUES (?,?,?,?)",
            (name, sha, status.value, at),
        )

    def _write_cohort(
        self,
        conn: sqlite3.Connection,
        name: str,
        sha: str,
        frame: pd.DataFrame,
        overlap_rows: int,
        at: str,
    ) -> Cohort:
        (last,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM cohorts").fetchone()
        seq = int(last) + 1
        cohort_id = f"{COHORT_PREFIX}{seq:06d}"
        target = self.accepted_dir / f"{cohort_id}.parquet"
        write_events(frame.reset_index(drop=True), target)
        self._fault_hook("after_parquet")
        stamps = frame[TIMESTAMP]
        cohort = Cohort(
            cohort_id=cohort_id,
            seq=seq,
            source_name=name,
            sha256=sha,
            rows=len(frame),
            overlap_rows=int(overlap_rows),
            first_event=stamps.min().isoformat(),
            last_event=stamps.max().isoformat(),
            accepted_at=at,
            path=target,
        )
        conn.execute(
            "INSERT INTO cohorts (seq, cohort_id, source_name, sha256, parquet_sha256, rows, "
            "overlap_rows, first_event, last_event, accepted_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                seq,
                cohort_id,
                name,
                sha,
                file_sha256(target),
                cohort.rows,
                cohort.overlap_rows,
                cohort.first_event,
                cohort.last_event,
                at,
            ),
        )
        return cohort

    # ------------------------------------------------------------------ reading

    def cohorts(self) -> list[Cohort]:
        """All accepted cohorts, oldest first."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT cohort_id, seq, source_name, sha256, rows, overlap_rows, first_event, "
                "last_event, accepted_at FROM cohorts ORDER BY seq"
            ).fetchall()
        return [
            Cohort(
                str(c),
                int(s),
                str(n),
                str(h),
                int(r),
                int(o),
                str(f),
                str(la),
                str(a),
                self.accepted_dir / f"{c}.parquet",
            )
            for c, s, n, h, r, o, f, la, a in rows
        ]

    def deliveries(self) -> list[tuple[str, FileStatus]]:
        """Every processed delivery (file name, outcome), in order, duplicates included."""
        with self._connect() as conn:
            rows = conn.execute("SELECT name, status FROM deliveries ORDER BY seq").fetchall()
        return [(str(n), FileStatus(s)) for n, s in rows]

    def _read_cohort(self, cohort_id: str) -> pd.DataFrame:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT parquet_sha256 FROM cohorts WHERE cohort_id = ?", (cohort_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"cohort {cohort_id!r} does not exist in {self.root}")
        return read_cohort_file(self.accepted_dir / f"{cohort_id}.parquet", str(row[0]))

    def load(self, cohort_ids: Sequence[str]) -> pd.DataFrame:
        """The events of ``cohort_ids`` (each file checked against its recorded hash)."""
        if not cohort_ids:
            raise ConfigError("load() needs at least one cohort id")
        frames = [self._read_cohort(c) for c in cohort_ids]
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def replay_sample(
        self, n: int, *, rng: np.random.Generator, before: str | None = None
    ) -> pd.DataFrame:
        """Up to ``n`` events drawn uniformly without replacement from older cohorts.

        ``before`` limits the draw to cohorts older than that cohort id (default: all). Only
        cohorts that contribute rows are read, so memory is bounded by those files.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"replay sample size must be an integer >= 0, got {n!r}")
        pool = self.cohorts()
        if before is not None:
            limit = next((c.seq for c in pool if c.cohort_id == before), None)
            if limit is None:
                raise NotFoundError(f"cohort {before!r} does not exist in {self.root}")
            pool = [c for c in pool if c.seq < limit]
        sizes = np.array([c.rows for c in pool], dtype=np.int64)
        total = int(sizes.sum())
        if total == 0 or n == 0:
            return self._empty_like()
        counts = rng.multivariate_hypergeometric(sizes, min(n, total))
        parts = []
        for cohort, k in zip(pool, counts, strict=True):
            if k:
                frame = self._read_cohort(cohort.cohort_id)
                rows = np.sort(rng.choice(len(frame), size=int(k), replace=False))
                parts.append(frame.iloc[rows])
        return pd.concat(parts, ignore_index=True)

    def _empty_like(self) -> pd.DataFrame:
        existing = self.cohorts()
        if existing:
            return self._read_cohort(existing[0].cohort_id).iloc[0:0]
        return pd.DataFrame(columns=list(KEY_COLUMNS))
