"""The privacy ledger: every DP release, signed and hash-chained, before weights leave.

One SQLite file per merchant (and one for the platform). Each entry's hash covers its
canonical JSON and the previous entry's hash; the merchant's Ed25519 key signs that hash.
Appends are single transactions with ``synchronous=FULL``, so an entry that ``append``
returned survives a kill -9; triggers refuse UPDATE and DELETE.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.accounting import AccountantKind, MechanismStep, PrivacyUnit
from common.errors import IntegrityError, LedgerError

GENESIS = "0" * 64
MECHANISM = "poisson_subsampled_gaussian"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    release_json TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL UNIQUE,
    signature TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_merchant ON entries (merchant_id, seq);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""


def _is_hex64(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class PrivacyRelease:
    """One DP release: a round of local training whose weights leave the merchant."""

    merchant_id: str
    run_id: str
    round: int
    model_in_sha256: str
    model_out_sha256: str
    cohort: str
    privacy_unit: PrivacyUnit
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clipping_norm: float
    delta: float
    dataset_size: int
    accountant: AccountantKind
    epsilon_after: float
    epsilon_cap: float
    config_sha256: str
    library_versions: Mapping[str, str] = field(default_factory=dict)
    created_utc: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "library_versions", MappingProxyType(dict(self.library_versions)))
        checks = [
            ("merchant_id", bool(self.merchant_id), "a non-empty string"),
            ("run_id", bool(self.run_id), "a non-empty string"),
            ("round", isinstance(self.round, int) and self.round >= 1, "an integer >= 1"),
            ("model_in_sha256", _is_hex64(self.model_in_sha256), "64 hex digits"),
            ("model_out_sha256", _is_hex64(self.model_out_sha256), "64 hex digits"),
            ("config_sha256", _is_hex64(self.config_sha256), "64 hex digits"),
            ("cohort", bool(self.cohort), "a non-empty string"),
            ("mechanism", self.mechanism == MECHANISM, repr(MECHANISM)),
            ("noise_multiplier", _finite(self.noise_multiplier) and self.noise_multiplier >= 0, ">= 0"),
            ("sample_rate", _finite(self.sample_rate) and 0 < self.sample_rate <= 1, "in (0, 1]"),
            ("steps", isinstance(self.steps, int) and self.steps >= 1, "an integer >= 1"),
            ("clipping_norm", _finite(self.clipping_norm) and self.clipping_norm > 0, "> 0"),
            ("delta", _finite(self.delta) and 0 < self.delta < 1, "in (0, 1)"),
            ("dataset_size", isinstance(self.dataset_size, int) and self.dataset_size >= 1, ">= 1"),
            ("epsilon_after", self.epsilon_after >= 0, ">= 0"),
            ("epsilon_cap", self.epsilon_cap > 0, "> 0"),
            ("created_utc", _is_utc(self.created_utc), "ISO-8601 UTC ending in Z"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise LedgerError(f"release field {name!r} must be {expected}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PrivacyUnit | AccountantKind):
                value = value.value
            elif isinstance(value, Mapping):
                value = dict(sorted(value.items()))
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyRelease:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise IntegrityError(
                f"release has fields {sorted(set(data) - names)} too many and "
                f"{sorted(names - set(data))} missing"
            )
        values = dict(data)
        try:
            values["privacy_unit"] = PrivacyUnit(values["privacy_unit"])
            values["accountant"] = AccountantKind(values["accountant"])
        except ValueError as exc:
            raise IntegrityError(f"release: {exc}") from None
        for name in ("round", "steps", "dataset_size"):
            if not isinstance(values[name], int) or isinstance(values[name], bool):
                raise IntegrityError(f"release field {name!r} must be an integer")
        try:
            return cls(**values)
        except LedgerError as exc:
            raise IntegrityError(str(exc)) from None

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def mechanism_step(self) -> MechanismStep:
        return MechanismStep(self.noise_multiplier, self.sample_rate, self.steps)


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _is_utc(value: str) -> bool:
    if not value.endswith("Z"):
        return False
    try:
        datetime.fromisoformat(value[:-1])
    except ValueError:
        return False
    return True


def canonical_json(data: Any) -> bytes:
    """Sorted keys, no spaces, floats as their shortest round-trip repr: one byte string per value."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def entry_hash(release_json: bytes, prev_hash: str, seq: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"fedshop-ledger-v1\n{seq}\n{prev_hash}\n".encode())
    digest.update(release_json)
    return digest.hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    release: PrivacyRelease
    prev_hash: str
    entry_hash: str
    signature: str  # hex Ed25519 signature over entry_hash

    def to_wire(self) -> str:
        return json.dumps({"seq": self.seq, "release": self.release.to_dict(),
                           "prev_hash": self.prev_hash, "entry_hash": self.entry_hash,
                           "signature": self.signature}, sort_keys=True)

    @classmethod
    def from_wire(cls, text: str) -> LedgerEntry:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise IntegrityError(f"ledger entry is not JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) != {"seq", "release", "prev_hash", "entry_hash", "signature"}:
            raise IntegrityError("ledger entry must have exactly seq, release, prev_hash, entry_hash, signature")
        if not isinstance(data["seq"], int) or data["seq"] < 1:
            raise IntegrityError(f"ledger entry field 'seq' must be an integer >= 1, got {data['seq']!r}")
        for name in ("prev_hash", "entry_hash"):
            if not isinstance(data[name], str) or not _is_hex64(data[name]):
                raise IntegrityError(f"ledger entry field {name!r} must be 64 hex digits")
        if not isinstance(data["signature"], str):
            raise IntegrityError("ledger entry field 'signature' must be a hex string")
        if not isinstance(data["release"], dict):
            raise IntegrityError("ledger entry field 'release' must be an object")
        return cls(data["seq"], PrivacyRelease.from_dict(data["release"]), data["prev_hash"],
                   data["entry_hash"], data["signature"])

    def verify(self, verify_key: Ed25519PublicKey, *, prev_hash: str) -> None:
        """Hash, chain link and signature; raises IntegrityError naming what is wrong."""
        where = f"entry {self.seq} of merchant {self.release.merchant_id!r}"
        if self.prev_hash != prev_hash:
            raise IntegrityError(f"{where}: chain broken (prev_hash does not match the entry before it)")
        if entry_hash(self.release.canonical(), self.prev_hash, self.seq) != self.entry_hash:
            raise IntegrityError(f"{where}: content does not match its hash")
        try:
            verify_key.verify(bytes.fromhex(self.signature), self.entry_hash.encode())
        except (InvalidSignature, ValueError):
            raise IntegrityError(f"{where}: signature does not verify with the merchant's key") from None


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc}") from None
    return conn


def _rows(conn: sqlite3.Connection, merchant_id: str | None = None) -> list[LedgerEntry]:
    query = "SELECT seq, release_json, prev_hash, entry_hash, signature FROM entries"
    params: tuple[Any, ...] = ()
    if merchant_id is not None:
        query += " WHERE merchant_id = ?"
        params = (merchant_id,)
    out = []
    for seq, release_json, prev, digest, signature in conn.execute(query + " ORDER BY seq", params):
        out.append(LedgerEntry(seq, PrivacyRelease.from_dict(json.loads(release_json)), prev, digest,
                               signature))
    return out


def verify_chain(entries: list[LedgerEntry], verify_key: Ed25519PublicKey, *, source: str) -> None:
    prev = GENESIS
    for expected_seq, entry in enumerate(entries, start=1):
        if entry.seq != expected_seq:
            raise IntegrityError(f"{source}: entry {expected_seq} is missing (found seq {entry.seq})")
        entry.verify(verify_key, prev_hash=prev)
        prev = entry.entry_hash


class MerchantLedger:
    """A merchant's own ledger; the only writer is the merchant's training client."""

    def __init__(self, path: Path, conn: sqlite3.Connection, merchant_id: str,
                 signing_key: Ed25519PrivateKey) -> None:
        self.path, self._conn, self.merchant_id, self._key = path, conn, merchant_id, signing_key

    @classmethod
    def open(cls, path: Path, *, merchant_id: str, signing_key: Ed25519PrivateKey) -> MerchantLedger:
        conn = _connect(path)
        ledger = cls(path, conn, merchant_id, signing_key)
        try:
            entries = ledger.entries()
            others = {e.release.merchant_id for e in entries} - {merchant_id}
            if others:
                raise IntegrityError(f"{path} holds entries of other merchants: {sorted(others)}")
            verify_chain(entries, signing_key.public_key(), source=str(path))
        except BaseException:
            conn.close()
            raise
        return ledger

    def entries(self) -> list[LedgerEntry]:
        try:
            return _rows(self._conn)
        except (sqlite3.Error, ValueError) as exc:
            raise IntegrityError(f"{self.path} cannot be read: {exc}") from None

    def history(self, cohort: str | None = None) -> list[MechanismStep]:
        return [e.release.mechanism_step for e in self.entries()
                if cohort is None or e.release.cohort == cohort]

    def find(self, run_id: str, round: int) -> LedgerEntry | None:
        matches = [e for e in self.entries() if e.release.run_id == run_id and e.release.round == round]
        return matches[-1] if matches else None

    def append(self, release: PrivacyRelease) -> LedgerEntry:
        if release.merchant_id != self.merchant_id:
            raise LedgerError(f"release for {release.merchant_id!r} cannot go into {self.merchant_id!r}'s ledger")
        payload = release.canonical()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            row = self._conn.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
            digest = entry_hash(payload, prev, seq)
            signature = self._key.sign(digest.encode()).hex()
            self._conn.execute(
                "INSERT INTO entries (seq, merchant_id, release_json, prev_hash, entry_hash, signature)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (seq, self.merchant_id, payload.decode(), prev, digest, signature),
            )
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise LedgerError(f"could not append to {self.path}: {exc}; nothing was released") from None
        return LedgerEntry(seq, release, prev, digest, signature)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> MerchantLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ExpectedRelease:
    """What the platform asked for; a merchant may be stricter, never looser."""

    run_id: str
    round: int
    model_in_sha256: str
    clipping_norm: float
    max_delta: float
    max_epsilon: float
    min_noise_multiplier: float = 0.0


class ServerLedger:
    """The platform's copy: every accepted entry of every merchant, verbatim."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path, self._conn = path, conn

    @classmethod
    def open(cls, path: Path) -> ServerLedger:
        return cls(path, _connect(path))

    def entries(self, merchant_id: str | None = None) -> list[LedgerEntry]:
        return _rows(self._conn, merchant_id)

    def _last(self, merchant_id: str) -> LedgerEntry | None:
        entries = self.entries(merchant_id)
        return entries[-1] if entries else None

    def accept(self, wire: str, *, verify_key: Ed25519PublicKey, expected: ExpectedRelease,
               model_out_sha256: str) -> LedgerEntry:
        entry = LedgerEntry.from_wire(wire)
        release = entry.release
        last = self._last(release.merchant_id)
        if last is not None and last.entry_hash == entry.entry_hash:
            return last  # the same release re-sent: already recorded
        entry.verify(verify_key, prev_hash=last.entry_hash if last else entry.prev_hash)
        if last is None and entry.seq != 1 and entry.prev_hash == GENESIS:
            raise IntegrityError(f"entry {entry.seq}: genesis link on a non-first entry")
        if last is not None and entry.seq != last.seq + 1:
            raise IntegrityError(f"entry {entry.seq} of {release.merchant_id!r} does not follow {last.seq}")
        _check_expected(release, expected, model_out_sha256)
        with _transaction(self._conn, self.path):
            self._conn.execute(
                "INSERT INTO entries (merchant_id, release_json, prev_hash, entry_hash, signature)"
                " VALUES (?, ?, ?, ?, ?)",
                (release.merchant_id, release.canonical().decode(), entry.prev_hash, entry.entry_hash,
                 entry.signature),
            )
        return entry

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ServerLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_expected(release: PrivacyRelease, expected: ExpectedRelease, model_out_sha256: str) -> None:
    problems = []
    if release.run_id != expected.run_id or release.round != expected.round:
        problems.append(f"run/round {release.run_id}/{release.round} != {expected.run_id}/{expected.round}")
    if release.model_in_sha256 != expected.model_in_sha256:
        problems.append("trained from another model than the one sent")
    if release.model_out_sha256 != model_out_sha256:
        problems.append("the weights received do not match the recorded release")
    if not math.isclose(release.clipping_norm, expected.clipping_norm, rel_tol=1e-12):
        problems.append(f"clipping norm {release.clipping_norm} != {expected.clipping_norm}")
    if release.delta > expected.max_delta:
        problems.append(f"delta {release.delta} > {expected.max_delta}")
    if release.epsilon_after > expected.max_epsilon + 1e-9:
        problems.append(f"epsilon {release.epsilon_after} > {expected.max_epsilon}")
    if release.noise_multiplier < expected.min_noise_multiplier:
        problems.append(f"noise {release.noise_multiplier} < {expected.min_noise_multiplier}")
    if problems:
        raise IntegrityError(f"release of {release.merchant_id!r} round {release.round}: " + "; ".join(problems))


@contextmanager
def _transaction(conn: sqlite3.Connection, path: Path) -> Iterator[None]:
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise LedgerError(f"could not write {path}: {exc}") from None
