"""Model registry: every global model version as a NumPy archive plus a signed manifest.

A version is two files, ``vNNNNNN.npz`` (named float arrays, never pickled) and
``vNNNNNN.manifest.json`` (the weights' SHA-256 and every field of the version, signed with the
platform's Ed25519 key), and one row in ``registry.sqlite``. The manifest is the source of truth:
versions are always read back from it after checking its signature, so editing the index, the
manifest or the weights is detected. The index also keeps the promotion history (which version
serves, and why) and the gate decisions.

Crash safety: the version id is reserved inside one SQLite write transaction; the two files are
written to temporary names, fsynced and renamed; only then is the row inserted and the
transaction committed. A crash leaves either no version (stray files are overwritten by the next
registration, whose id is the same) or a complete one.

The index is never recreated over existing versions: a missing, empty or unreadable
``registry.sqlite`` beside version files is an integrity error, since an empty index would
silently drop the promotion history. Only the platform's training loop creates a registry;
the ``model`` commands open one with ``create=False``.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import math
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import sqlite_store
from common.atomic import atomic_write_bytes
from common.canonical import canonical_json
from common.errors import ConfigError, IntegrityError, NotFoundError, StateError
from common.keys import key_fingerprint
from common.model_manifest import (
    MANIFEST_FORMAT,
    array_specs,
    sign_manifest,
    verify_manifest,
    verify_weights,
)

__all__ = [
    "MANIFEST_FORMAT",
    "GateDecision",
    "ModelRegistry",
    "ModelVersion",
    "Promotion",
    "PromotionAction",
    "canonical_json",
    "gate",
]

INDEX_NAME = "registry.sqlite"
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_VERSION_FILE = re.compile(r"^v[0-9]+\.(npz|manifest\.json)$")
_TABLES = frozenset({"versions", "promotions", "gate_decisions"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    weights_file TEXT NOT NULL,
    manifest_file TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS promotions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    previous_seq INTEGER,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS gate_decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_id INTEGER NOT NULL REFERENCES versions(id),
    current_id INTEGER,
    promoted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


class PromotionAction(Enum):
    """Why the serving version changed."""

    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version, as stated by its verified manifest."""

    id: int
    parent: int | None
    round: int
    merchants: tuple[str, ...]
    metrics: Mapping[str, float]
    privacy: Mapping[str, float]
    weights_sha256: str
    weights_file: Path
    manifest_file: Path
    arrays: Mapping[str, tuple[str, tuple[int, ...]]]
    created_at: str


@dataclass(frozen=True)
class Promotion:
    """One row of the promotion history."""

    seq: int
    version_id: int
    action: PromotionAction
    reason: str
    at: str


@dataclass(frozen=True)
class GateDecision:
    """Whether a candidate may replace the serving model, and why."""

    promote: bool
    metric: str
    candidate: float | None
    current: float | None
    tolerance: float
    reason: str


def gate(
    candidate_metrics: Mapping[str, float],
    current_metrics: Mapping[str, float] | None,
    *,
    metric: str = "ndcg@10",
    tolerance: float = 0.01,
    higher_is_better: bool = True,
) -> GateDecision:
    """Promote only if the candidate is no worse than the current model by more than ``tolerance``.

    ``tolerance`` is absolute, in the metric's units. With no current model any candidate with a
    finite value of ``metric`` passes; a missing or non-finite candidate value never passes.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"gate tolerance must be a finite number >= 0, got {tolerance!r}")
    raw = candidate_metrics.get(metric)
    candidate = float(raw) if raw is not None else None
    if candidate is None or not math.isfinite(candidate):
        reason = f"candidate has no finite {metric} (got {raw!r}); kept, not promoted"
        return GateDecision(False, metric, candidate, None, tolerance, reason)
    current_raw = None if current_metrics is None else current_metrics.get(metric)
    if current_raw is None or not math.isfinite(float(current_raw)):
        reason = f"no current {metric} to compare with; candidate {metric}={candidate:.6g} promoted"
        return GateDecision(True, metric, candidate, None, tolerance, reason)
    current = float(current_raw)
    loss = (current - candidate) if higher_is_better else (candidate - current)
    direction = "higher" if higher_is_better else "lower"
    summary = (
        f"candidate {metric}={candidate:.6g} vs current {current:.6g} "
        f"({direction} is better, tolerance {tolerance:.6g})"
    )
    if loss <= tolerance:
        return GateDecision(True, metric, candidate, current, tolerance, f"{summary}: promoted")
    worse = f"worse by {loss:.6g} > tolerance"
    return GateDecision(
        False, metric, candidate, current, tolerance, f"{summary}: {worse}; kept, not promoted"
    )


def _now_iso(now: datetime | None) -> str:
    moment = now if now is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        raise ConfigError(f"timestamps must be timezone-aware, got {moment!r}")
    return moment.astimezone(UTC).isoformat()


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not arrays:
        raise ConfigError("a model version needs at least one array")
    checked: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not _ARRAY_NAME.match(name):
            raise ConfigError(f"array name {name!r} must match {_ARRAY_NAME.pattern}")
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise ConfigError(f"array {name!r} has dtype {array.dtype}; only float arrays")
        if not np.all(np.isfinite(array)):
            raise ConfigError(f"array {name!r} contains NaN or infinite values")
        checked[name] = np.ascontiguousarray(array)
    return checked


def _check_float_map(values: Mapping[str, float], what: str, *, non_negative: bool) -> dict:
    checked: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{what} key {key!r} must be a non-empty string")
        number = float(value)
        if not math.isfinite(number) or (non_negative and number < 0):
            bound = "finite and >= 0" if non_negative else "finite"
            raise ConfigError(f"{what}[{key!r}] must be {bound}, got {value!r}")
        checked[key] = number
    return checked


def _check_merchants(merchants: Sequence[str], privacy: Mapping[str, float]) -> tuple[str, ...]:
    names = tuple(merchants)
    if any(not isinstance(m, str) or not m for m in names):
        raise ConfigError(f"merchant ids must be non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"merchant ids must be unique, got {names!r}")
    missing = sorted(set(names) - set(privacy))
    if missing:
        raise ConfigError(f"privacy summary has no epsilon for contributing merchants {missing}")
    return tuple(sorted(names))


@contextlib.contextmanager
def _index_errors(path: Path) -> Iterator[None]:
    """A file that is not a SQLite database (junk, truncated) as a one-line integrity error.

    Only the plain ``DatabaseError`` is translated: its subclasses (a locked database, a
    constraint) say something else and keep their own meaning.
    """
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError:
            raise
        raise IntegrityError(f"registry index {path} is not a readable database: {exc}") from None


def _serialise_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


class ModelRegistry:
    """Versions, promotion history and gate decisions under one directory.

    ``signing_key`` may be ``None`` for read-only use (listing, promoting, loading); registering
    a version then fails. ``verify_key`` is always needed: nothing is returned unverified.
    ``create=False`` opens an existing registry only, so that a mistyped path is an error
    instead of a new, empty registry.
    """

    def __init__(
        self,
        root: Path,
        *,
        signing_key: Ed25519PrivateKey | None,
        verify_key: Ed25519PublicKey,
        create: bool = True,
    ) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.index_path = self.root / INDEX_NAME
        self._signing_key = signing_key
        self._verify_key = verify_key
        self._fault_hook: Callable[[str], None] = _no_fault
        self._open_index(create=create)

    def _open_index(self, *, create: bool) -> None:
        """Check that ``root`` holds a registry (or create one); never overwrite lost history."""
        for directory in (self.root, self.versions_dir):
            if directory.exists() and not directory.is_dir():
                raise ConfigError(f"model registry path {directory} is not a directory")
        if not create and not self.root.exists():
            raise ConfigError(f"model registry {self.root} does not exist")
        if self.index_path.exists() and not self.index_path.is_file():
            raise IntegrityError(f"registry index {self.index_path} is not a file")
        tables: set[str] = set()
        if self.index_path.exists():
            with self._connect() as conn:
                rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                tables = {str(name) for (name,) in rows}
        if _TABLES.issubset(tables):
            return
        if tables:
            raise IntegrityError(
                f"registry index {self.index_path} is not a model registry index "
                f"(tables {sorted(tables)})"
            )
        stray = self._version_files()
        if stray:
            raise IntegrityError(
                f"registry index {self.index_path} is missing or empty but {self.versions_dir} "
                f"holds {len(stray)} version file(s) (e.g. {stray[0]}); restore the index from "
                "a backup instead of recreating it, which would lose the promotion history"
            )
        if not create:
            raise ConfigError(f"{self.root} is not a model registry: it has no {INDEX_NAME}")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    def _version_files(self) -> builtins.list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if _VERSION_FILE.match(p.name))

    gate = staticmethod(gate)

    @property
    def verify_key(self) -> Ed25519PublicKey:
        """The platform key every manifest of this registry verifies against."""
        return self._verify_key

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._open(sqlite_store.connect)

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._open(sqlite_store.transaction)

    @contextlib.contextmanager
    def _open(
        self, opener: Callable[..., contextlib.AbstractContextManager[sqlite3.Connection]]
    ) -> Iterator[sqlite3.Connection]:
        with _index_errors(self.index_path), opener(self.index_path, foreign_keys=True) as conn:
            yield conn

    def register(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        parent: int | None,
        round: int,
        merchants: Sequence[str],
        metrics: Mapping[str, float],
        privacy: Mapping[str, float],
        now: datetime | None = None,
    ) -> ModelVersion:
        """Store a new version atomically and return it (read back and verified)."""
        if self._signing_key is None:
            raise ConfigError("this registry was opened without a signing key; cannot register")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ConfigError(f"round must be an integer >= 0, got {round!r}")
        checked = _check_arrays(arrays)
        privacy_map = _check_float_map(privacy, "privacy", non_negative=True)
        metric_map = _check_float_map(metrics, "metrics", non_negative=False)
        merchant_ids = _check_merchants(merchants, privacy_map)
        weights = _serialise_npz(checked)
        created_at = _now_iso(now)
        with self._transaction() as conn:
            if parent is not None and not self._exists(conn, parent):
                raise NotFoundError(f"parent version {parent!r} does not exist")
            (last,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM versions").fetchone()
            version_id = int(last) + 1
            weights_name = f"v{version_id:06d}.npz"
            manifest_name = f"v{version_id:06d}.manifest.json"
            manifest = {
                "format": MANIFEST_FORMAT,
                "version_id": version_id,
                "parent_id": parent,
                "created_round": round,
                "created_at": created_at,
                "merchants": list(merchant_ids),
                "metrics": metric_map,
                "privacy": privacy_map,
                "weights_file": weights_name,
                "weights_sha256": hashlib.sha256(weights).hexdigest(),
                "weights_bytes": len(weights),
                "arrays": {
                    k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in checked.items()
                },
                "key_fingerprint": key_fingerprint(self._verify_key),
            }
            envelope = sign_manifest(manifest, self._signing_key)
            atomic_write_bytes(self.versions_dir / weights_name, weights)
            self._fault_hook("after_weights")
            atomic_write_bytes(self.versions_dir / manifest_name, envelope)
            self._fault_hook("after_manifest")
            conn.execute(
                "INSERT INTO versions (id, weights_file, manifest_file, created_at) "
                "VALUES (?,?,?,?)",
                (version_id, weights_name, manifest_name, created_at),
            )
            self._fault_hook("before_commit")
        return self.get(version_id)

    @staticmethod
    def _exists(conn: sqlite3.Connection, version_id: int) -> bool:
        row = conn.execute("SELECT 1 FROM versions WHERE id = ?", (version_id,)).fetchone()
        return row is not None

    def _row(self, version_id: int) -> tuple[str, str]:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT weights_file, manifest_file FROM versions WHERE id = ?", (version_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"model version {version_id!r} does not exist in {self.root}")
        return str(row[0]), str(row[1])

    def _read_manifest(self, version_id: int) -> tuple[dict[str, Any], bytes]:
        """The verified manifest of ``version_id`` and the envelope bytes it was read from."""
        weights_name, manifest_name = self._row(version_id)
        path = self.versions_dir / manifest_name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"manifest {path} of version {version_id} is missing") from None
        manifest = verify_manifest(data, self._verify_key, source=f"manifest {path}")
        if manifest.get("version_id") != version_id or manifest.get("weights_file") != weights_name:
            raise IntegrityError(f"manifest {path} belongs to another version; index tampered?")
        return manifest, data

    def get(self, version_id: int) -> ModelVersion:
        """The version ``version_id``; its manifest signature is checked (not yet its weights)."""
        manifest, _ = self._read_manifest(version_id)
        return ModelVersion(
            id=version_id,
            parent=manifest["parent_id"],
            round=int(manifest["created_round"]),
            merchants=tuple(manifest["merchants"]),
            metrics=dict(manifest["metrics"]),
            privacy=dict(manifest["privacy"]),
            weights_sha256=str(manifest["weights_sha256"]),
            weights_file=self.versions_dir / manifest["weights_file"],
            manifest_file=self.versions_dir / self._row(version_id)[1],
            arrays=array_specs(manifest),
            created_at=str(manifest["created_at"]),
        )

    def list(self) -> builtins.list[ModelVersion]:
        """All versions, oldest first, each verified against its signed manifest."""
        with self._connect() as conn:
            ids = [int(r[0]) for r in conn.execute("SELECT id FROM versions ORDER BY id")]
        return [self.get(i) for i in ids]

    def _verified(self, version_id: int) -> tuple[bytes, bytes, dict[str, np.ndarray]]:
        """Manifest envelope bytes, weights bytes and arrays of ``version_id``, all verified."""
        manifest, envelope = self._read_manifest(version_id)
        path = self.versions_dir / manifest["weights_file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(
                f"weights file {path} of version {version_id} is missing"
            ) from None
        return envelope, data, verify_weights(manifest, data, source=str(path))

    def load_arrays(self, version_id: int) -> dict[str, np.ndarray]:
        """The weights of ``version_id``, after checking the manifest signature and file hash."""
        return self._verified(version_id)[2]

    def signed_files(self, version_id: int) -> tuple[bytes, bytes]:
        """The manifest envelope and weights bytes of ``version_id`` (verified here first): what
        a merchant's mirror receives and checks again with the platform key it pinned."""
        envelope, weights, _ = self._verified(version_id)
        return envelope, weights

    def _current(self, conn: sqlite3.Connection) -> tuple[int, int, int | None] | None:
        row = conn.execute(
            "SELECT seq, version_id, previous_seq FROM promotions ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), row[2])

    def promoted(self) -> ModelVersion | None:
        """The version that serves now, or ``None`` if none was ever promoted."""
        with self._connect() as conn:
            current = self._current(conn)
        return None if current is None else self.get(current[1])

    def promote(self, version_id: int, *, reason: str, now: datetime | None = None) -> ModelVersion:
        """Make ``version_id`` the serving version (its weights are verified first)."""
        if not reason.strip():
            raise ConfigError("a promotion needs a non-empty reason")
        self.load_arrays(version_id)
        at = _now_iso(now)
        with self._transaction() as conn:
            current = self._current(conn)
            conn.execute(
                "INSERT INTO promotions (version_id, action, reason, previous_seq, at) "
                "VALUES (?,?,?,?,?)",
                (version_id, PromotionAction.PROMOTE.value, reason, current and current[0], at),
            )
        return self.get(version_id)

    def rollback(self, *, reason: str, now: datetime | None = None) -> ModelVersion:
        """Serve again the version promoted before the current one (a stack: repeatable).

        The target is verified exactly as a promotion verifies it, inside the transaction and
        before the row is written: a version that fails verification is never served again.
        """
        if not reason.strip():
            raise ConfigError("a rollback needs a non-empty reason")
        at = _now_iso(now)
        with self._transaction() as conn:
            current = self._current(conn)
            if current is None or current[2] is None:
                raise StateError("nothing to roll back to: no earlier promoted version")
            target = conn.execute(
                "SELECT version_id, previous_seq FROM promotions WHERE seq = ?", (current[2],)
            ).fetchone()
            self.load_arrays(int(target[0]))  # raises, and the transaction rolls back
            conn.execute(
                "INSERT INTO promotions (version_id, action, reason, previous_seq, at) "
                "VALUES (?,?,?,?,?)",
                (int(target[0]), PromotionAction.ROLLBACK.value, reason, target[1], at),
            )
        return self.get(int(target[0]))

    def history(self) -> builtins.list[Promotion]:
        """The promotion history, oldest first."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT seq, version_id, action, reason, at FROM promotions ORDER BY seq"
            ).fetchall()
        return [
            Promotion(int(s), int(v), PromotionAction(a), str(r), str(t)) for s, v, a, r, t in rows
        ]

    def gate_candidate(
        self,
        candidate_id: int,
        *,
        current_metrics: Mapping[str, float] | None = None,
        metric: str = "ndcg@10",
        tolerance: float = 0.01,
        higher_is_better: bool = True,
        now: datetime | None = None,
    ) -> GateDecision:
        """Gate ``candidate_id`` against the serving version; record why; promote if it passes.

        ``current_metrics`` are the serving model's scores on the candidate's own gate data
        (the fair comparison); without them the serving version's recorded metrics are used.
        """
        candidate = self.get(candidate_id)
        current = self.promoted()
        if current_metrics is None and current is not None:
            current_metrics = current.metrics
        decision = gate(
            candidate.metrics,
            current_metrics,
            metric=metric,
            tolerance=tolerance,
            higher_is_better=higher_is_better,
        )
        at = _now_iso(now)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO gate_decisions (candidate_id, current_id, promoted, reason, at) "
                "VALUES (?,?,?,?,?)",
                (candidate_id, current and current.id, int(decision.promote), decision.reason, at),
            )
        if decision.promote:
            self.promote(candidate_id, reason=f"gate: {decision.reason}", now=now)
        return decision

    def gate_history(
        self, candidate_id: int | None = None
    ) -> builtins.list[tuple[int, int | None, bool, str]]:
        """Recorded gate decisions (of one candidate if given): (candidate, current, promoted,
        reason), oldest first."""
        query = "SELECT candidate_id, current_id, promoted, reason FROM gate_decisions"
        params: tuple[int, ...] = ()
        if candidate_id is not None:
            query += " WHERE candidate_id = ?"
            params = (candidate_id,)
        with self._connect() as conn:
            rows = conn.execute(query + " ORDER BY seq", params).fetchall()
        return [(int(c), cur, bool(p), str(r)) for c, cur, p, r in rows]


def _no_fault(step: str) -> None:
    """Default fault hook; tests replace it to simulate a crash at ``step``."""
