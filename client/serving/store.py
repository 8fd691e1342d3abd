"""What the service showed and what customers bought afterwards (``serving.sqlite``).

Tables: ``impressions`` (one row per answered recommendation request: time, customer, arm,
version, candidate), ``shown`` (the products of each response with rank and score),
``purchases`` (every purchase event the merchant reported, keyed by the inbox's event key, with
the response it joins, if any) and ``attributed_cohorts`` (inbox cohorts already joined). All of
it is customer-level data and never leaves the merchant.

Writes from the request path go through :class:`ImpressionWriter`, a background thread that
commits batches, so a response never waits for the disk; the database runs in WAL mode so that a
report can read while the service writes. A crash loses at most the last unflushed batch of
impressions (``flush_interval_s``), never a committed one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE_NAME = "serving.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS impressions (
    id TEXT PRIMARY KEY,
    at_ns INTEGER NOT NULL,
    customer TEXT NOT NULL,
    arm TEXT NOT NULL,
    version INTEGER NOT NULL,
    candidate INTEGER,
    k INTEGER NOT NULL,
    known INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS impressions_by_customer ON impressions (customer, at_ns);
CREATE INDEX IF NOT EXISTS impressions_by_candidate ON impressions (candidate, at_ns);
CREATE TABLE IF NOT EXISTS shown (
    impression TEXT NOT NULL,
    product TEXT NOT NULL,
    rank INTEGER NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (impression, product)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS purchases (
    key BLOB PRIMARY KEY,
    customer TEXT NOT NULL,
    product TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    revenue REAL NOT NULL,
    impression TEXT,
    rank INTEGER,
    source TEXT NOT NULL,
    recorded_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS purchases_by_impression ON purchases (impression);
CREATE TABLE IF NOT EXISTS attributed_cohorts (cohort_id TEXT PRIMARY KEY, at TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Impression:
    """One answered request: what was shown to whom, from which version and arm."""

    id: str
    at_ns: int
    customer: str
    arm: str
    version: int
    candidate: int | None
    products: Sequence[str]
    scores: Sequence[float]
    known: bool


class ServingStore:
    """The merchant's serving database (one file, shared by the service and the CLI)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DATABASE_NAME
        with self.connect() as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def add_impressions(self, impressions: Sequence[Impression]) -> None:
        """Store responses (all or nothing); an id seen before is ignored."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO impressions (id, at_ns, customer, arm, version, candidate, "
                "k, known) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        i.id,
                        i.at_ns,
                        i.customer,
                        i.arm,
                        i.version,
                        i.candidate,
                        len(i.products),
                        int(i.known),
                    )
                    for i in impressions
                ],
            )
            conn.executemany(
                "INSERT OR IGNORE INTO shown (impression, product, rank, score) VALUES (?,?,?,?)",
                [
                    (i.id, product, rank, float(score))
                    for i in impressions
                    for rank, (product, score) in enumerate(
                        zip(i.products, i.scores, strict=True), start=1
                    )
                ],
            )

    def prune(self, before_ns: int) -> int:
        """Forget responses older than ``before_ns`` (and what they showed); purchases stay, so
        a purchase reported again is still recognised. Returns the responses removed."""
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM shown WHERE impression IN "
                "(SELECT id FROM impressions WHERE at_ns < ?)",
                (before_ns,),
            )
            return conn.execute("DELETE FROM impressions WHERE at_ns < ?", (before_ns,)).rowcount

    def counts(self) -> dict[str, int]:
        with self.connect() as conn:
            return {
                table: int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                for table in ("impressions", "shown", "purchases", "attributed_cohorts")
            }


class ImpressionWriter:
    """Commits impressions in batches from a background thread; :meth:`log` never blocks.

    When the queue is full (the disk cannot keep up) an impression is dropped and ``on_drop`` is
    called, so the drop is counted, rather than slowing every response down.
    """

    def __init__(
        self,
        store: ServingStore,
        *,
        flush_interval_s: float = 0.2,
        max_queue: int = 100_000,
        on_drop: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._queue: queue.Queue[Impression | None] = queue.Queue(maxsize=max_queue)
        self._interval = flush_interval_s
        self._on_drop = on_drop
        self._flushed = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="impression-writer", daemon=True)
        self._thread.start()

    def log(self, impression: Impression) -> None:
        with self._flushed:
            self._pending += 1
        try:
            self._queue.put_nowait(impression)
        except queue.Full:
            with self._flushed:
                self._pending -= 1
            self._on_drop()

    def _drain(self, first: Impression) -> tuple[list[Impression], bool]:
        batch, stop = [first], False
        while len(batch) < 5000:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._drain(first)
            try:
                self._store.add_impressions(batch)
            except sqlite3.Error as exc:  # keep serving; the loss is logged
                log.error("could not store %d impressions: %s", len(batch), exc)
            with self._flushed:
                self._pending -= len(batch)
                self._flushed.notify_all()
            if stop:
                return
            self._flushed_wait()

    def _flushed_wait(self) -> None:
        # batch up: wait a little for more impressions unless someone waits for a flush
        with self._flushed:
            self._flushed.wait(timeout=self._interval)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything logged so far is committed; False on timeout."""
        with self._flushed:
            self._flushed.notify_all()  # cut the batching wait short
            return self._flushed.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self) -> None:
        """Flush what is queued and stop the thread."""
        self._queue.put(None)
        with self._flushed:
            self._flushed.notify_all()
        self._thread.join(timeout=30.0)
