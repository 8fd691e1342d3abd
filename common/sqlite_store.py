"""SQLite connections for fedshop's small durable indexes (inbox, model registry).

Autocommit connections with ``synchronous=FULL`` and explicit ``BEGIN IMMEDIATE``
transactions: a committed row survives a crash, and a failed block leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def connect(path: Path, *, foreign_keys: bool = False) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        if foreign_keys:
            conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def transaction(path: Path, *, foreign_keys: bool = False) -> Iterator[sqlite3.Connection]:
    with connect(path, foreign_keys=foreign_keys) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
