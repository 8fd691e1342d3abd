"""The tamper-evident privacy ledger: one signed, hash-chained entry per privacy release.

Before any weights leave a merchant, its client appends a :class:`PrivacyRelease` to the
merchant's SQLite ledger (one transaction, fsynced); the entry is signed with the merchant's
Ed25519 key and chained to the previous entry by SHA-256. The server checks each incoming
entry (:meth:`ServerLedger.accept`) and stores it verbatim, so the merchant's and the server's
copies must agree entry by entry; auditors recompute every epsilon from the logged mechanism
parameters (``common.audit``).

Hashes: ``entry_hash = sha256(DOMAIN + canonical({"prev_hash", "release", "seq"}))``, the
signature is Ed25519 over the 32 bytes of ``entry_hash``, and the next entry's ``prev_hash`` is
``sha256(canonical({"entry_hash", "prev_hash", "release", "seq", "signature"}))``; the first
entry's ``prev_hash`` is 64 zeros. Canonical JSON: sorted keys, no spaces, ASCII, floats as
Python's shortest round-trip ``repr``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple, Self, overload

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.accounting import AccountantKind, MechanismStep, PrivacyUnit
from common.errors import (
    ConfigError,
    FedshopError,
    IntegrityError,
    LedgerError,
    PrivacyBudgetExceededError,
)
from common.keys import NAME_PATTERN

GENESIS_HASH = "0" * 64
MECHANISM = "poisson_subsampled_gaussian"
LEDGER_FORMAT = "fedshop-ledger/1"
WIRE_FORMAT = "fedshop-ledger-entry/1"
HASH_DOMAIN = b"fedshop-ledger-entry/1\n"
BUSY_TIMEOUT_S = 10.0

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_TOKEN = re.compile(r"[!-~]{1,200}")
_UTC_ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")

_FLOAT_FIELDS = (
    "noise_multiplier",
    "sample_rate",
    "clipping_norm",
    "delta",
    "epsilon_after",
    "epsilon_cap",
)
_INT_FIELDS = ("round", "steps", "dataset_size")


def canonical_json(obj: Any) -> str:
    """The one serialisation that is hashed and signed (floats round-trip exactly)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now_iso() -> str:
    """Current time as ISO-8601 UTC with a ``Z`` suffix (microseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_hex64(name: str, value: object) -> None:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ConfigError(f"{name} must be 64 lowercase hex digits, got {value!r}")


def _check_token(name: str, value: object) -> None:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ConfigError(f"{name} must be 1-200 printable ASCII characters, got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_created(value: object) -> None:
    if not isinstance(value, str) or not _UTC_ISO.fullmatch(value):
        raise ConfigError(f"created_utc must be ISO-8601 UTC ending in Z, got {value!r}")
    try:
        datetime.fromisoformat(value[:-1])
    except ValueError:
        raise ConfigError(f"created_utc is not a real date and time: {value!r}") from None


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return number


def _check_ranges(v: Mapping[str, float]) -> None:
    if v["noise_multiplier"] < 0:
        raise ConfigError(f"noise_multiplier must be >= 0, got {v['noise_multiplier']!r}")
    if not 0 < v["sample_rate"] <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {v['sample_rate']!r}")
    if v["clipping_norm"] <= 0:
        raise ConfigError(f"clipping_norm must be > 0, got {v['clipping_norm']!r}")
    if not 0 < v["delta"] < 1:
        raise ConfigError(f"delta must be in (0, 1), got {v['delta']!r}")
    if v["epsilon_after"] < 0:
        raise ConfigError(f"epsilon_after must be >= 0, got {v['epsilon_after']!r}")
    if v["epsilon_cap"] <= 0:
        raise ConfigError(f"epsilon_cap must be > 0, got {v['epsilon_cap']!r}")


def _check_versions(versions: object) -> None:
    if not isinstance(versions, Mapping):
        raise ConfigError(f"library_versions must be a mapping, got {versions!r}")
    for key, value in versions.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"library_versions: {key!r}: {value!r} is not str -> str")


def _check_release(v: Mapping[str, Any]) -> dict[str, float]:
    """Every rule of a :class:`PrivacyRelease` over its field values (enums as members), in
    one place for the dataclass and for bulk audits; returns the float fields as floats.
    ConfigError names the first bad field."""
    merchant_id = v["merchant_id"]
    if not isinstance(merchant_id, str) or not NAME_PATTERN.fullmatch(merchant_id):
        raise ConfigError(f"merchant_id {merchant_id!r} is not a valid merchant name")
    _check_token("run_id", v["run_id"])
    _check_token("cohort", v["cohort"])
    for name in ("model_in_sha256", "model_out_sha256", "config_sha256"):
        _check_hex64(name, v[name])
    for name in _INT_FIELDS:
        _check_int(name, v[name], 1)
    if not isinstance(v["privacy_unit"], PrivacyUnit):
        raise ConfigError(f"privacy_unit must be a PrivacyUnit, got {v['privacy_unit']!r}")
    if not isinstance(v["accountant"], AccountantKind):
        raise ConfigError(f"accountant must be an AccountantKind, got {v['accountant']!r}")
    if v["mechanism"] != MECHANISM:
        raise ConfigError(f"mechanism must be {MECHANISM!r}, got {v['mechanism']!r}")
    floats = {name: _check_number(name, v[name]) for name in _FLOAT_FIELDS}
    _check_ranges(floats)
    _check_versions(v["library_versions"])
    _check_created(v["created_utc"])
    return floats


def _release_values(data: object) -> dict[str, Any]:
    """A release's JSON object as field values: exactly the known keys, enums by value."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"release must be a JSON object, got {type(data).__name__}")
    if data.keys() != _RELEASE_FIELDS:
        missing, unknown = _RELEASE_FIELDS - set(data), set(data) - _RELEASE_FIELDS
        raise ConfigError(f"release fields: missing {sorted(missing)}, unknown {sorted(unknown)}")
    values = dict(data)
    try:
        values["privacy_unit"] = PrivacyUnit(data["privacy_unit"])
    except ValueError:
        raise ConfigError(f"privacy_unit {data['privacy_unit']!r} is not known") from None
    try:
        values["accountant"] = AccountantKind(data["accountant"])
    except ValueError:
        raise ConfigError(f"accountant {data['accountant']!r} is not known") from None
    return values


@dataclass(frozen=True)
class PrivacyRelease:
    """What a merchant states about one release of model weights (immutable, signed)."""

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
    created_utc: str = field(default_factory=lambda: utc_now_iso())

    def __post_init__(self) -> None:
        for name, number in _check_release(self.__dict__).items():
            object.__setattr__(self, name, number)
        frozen = types.MappingProxyType(dict(sorted(self.library_versions.items())))
        object.__setattr__(self, "library_versions", frozen)

    @property
    def mechanism_step(self) -> MechanismStep:
        """The (sigma, q, steps) the accountant composes."""
        return MechanismStep(self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["privacy_unit"] = self.privacy_unit.value
        data["accountant"] = self.accountant.value
        data["library_versions"] = dict(self.library_versions)
        return data

    @cached_property
    def canonical_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> PrivacyRelease:
        """Strict inverse of :meth:`to_dict`: exactly the known keys, enums by value."""
        return cls(**_release_values(data))


_RELEASE_FIELDS = frozenset(PrivacyRelease.__dataclass_fields__)


def _entry_hash(release_json: str, *, seq: int, prev_hash: str) -> str:
    # Equal to canonical_json({"prev_hash":..., "release":..., "seq":...}) (tested).
    text = f'{{"prev_hash":"{prev_hash}","release":{release_json},"seq":{seq}}}'
    return sha256_hex(HASH_DOMAIN + text.encode("ascii"))


def _chain_hash(release_json: str, *, seq: int, prev_hash: str, entry_hash: str, sig: str) -> str:
    text = (
        f'{{"entry_hash":"{entry_hash}","prev_hash":"{prev_hash}","release":{release_json},'
        f'"seq":{seq},"signature":"{sig}"}}'
    )
    return sha256_hex(text.encode("ascii"))


@dataclass(frozen=True)
class LedgerEntry:
    """One signed ledger row; ``to_wire`` is what travels from merchant to server."""

    seq: int
    release: PrivacyRelease
    prev_hash: str
    entry_hash: str
    signature: str

    @property
    def merchant_id(self) -> str:
        return self.release.merchant_id

    def chain_hash(self) -> str:
        """The ``prev_hash`` the next entry of this merchant must carry."""
        return _chain_hash(
            self.release.canonical_json,
            seq=self.seq,
            prev_hash=self.prev_hash,
            entry_hash=self.entry_hash,
            sig=self.signature,
        )

    def to_wire(self) -> str:
        return canonical_json(
            {
                "format": WIRE_FORMAT,
                "seq": self.seq,
                "release": self.release.to_dict(),
                "prev_hash": self.prev_hash,
                "entry_hash": self.entry_hash,
                "signature": self.signature,
            }
        )

    @classmethod
    def from_wire(cls, text: str) -> LedgerEntry:
        """Parse a wire entry strictly; IntegrityError names the bad field. Does not verify."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise IntegrityError(f"ledger entry is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise IntegrityError("ledger entry must be a JSON object")
        keys = {"format", "seq", "release", "prev_hash", "entry_hash", "signature"}
        if set(data) != keys:
            raise IntegrityError(
                f"ledger entry fields: missing {sorted(keys - set(data))}, "
                f"unknown {sorted(set(data) - keys)}"
            )
        if data["format"] != WIRE_FORMAT:
            raise IntegrityError(f"format: expected {WIRE_FORMAT!r}, got {data['format']!r}")
        try:
            release = PrivacyRelease.from_dict(data["release"])
        except (ConfigError, TypeError) as exc:
            raise IntegrityError(f"release: {exc}") from None
        return cls._build(
            data["seq"], release, data["prev_hash"], data["entry_hash"], data["signature"]
        )

    @classmethod
    def _build(
        cls, seq: object, release: PrivacyRelease, prev: object, entry: object, sig: object
    ) -> LedgerEntry:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise IntegrityError(f"seq must be an integer >= 1, got {seq!r}")
        for name, value, pattern in (
            ("prev_hash", prev, _HEX64),
            ("entry_hash", entry, _HEX64),
            ("signature", sig, _HEX128),
        ):
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise IntegrityError(f"{name} is not lowercase hex of the right length: {value!r}")
        assert isinstance(prev, str) and isinstance(entry, str) and isinstance(sig, str)
        return cls(seq=seq, release=release, prev_hash=prev, entry_hash=entry, signature=sig)

    def problem(self, verify_key: Ed25519PublicKey | None) -> str | None:
        """Why this entry does not verify on its own (hash, then signature), or None."""
        computed = _entry_hash(self.release.canonical_json, seq=self.seq, prev_hash=self.prev_hash)
        if computed != self.entry_hash:
            return (
                "entry_hash does not match the entry's contents (release, seq or prev_hash changed)"
            )
        if verify_key is not None:
            try:
                verify_key.verify(bytes.fromhex(self.signature), bytes.fromhex(self.entry_hash))
            except InvalidSignature:
                return "signature does not verify with the merchant's public key"
        return None


def seal(
    release: PrivacyRelease, *, seq: int, prev_hash: str, signing_key: Ed25519PrivateKey
) -> LedgerEntry:
    """Hash and sign ``release`` as entry ``seq`` after ``prev_hash`` (no storage)."""
    entry_hash = _entry_hash(release.canonical_json, seq=seq, prev_hash=prev_hash)
    signature = signing_key.sign(bytes.fromhex(entry_hash)).hex()
    return LedgerEntry(seq, release, prev_hash, entry_hash, signature)


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Finding:
    """The first thing wrong in a ledger: where, and why."""

    merchant_id: str
    seq: int
    reason: str

    def __str__(self) -> str:
        return f"merchant {self.merchant_id} seq {self.seq}: {self.reason}"


class LedgerRow(NamedTuple):
    """One raw row as stored (before any verification); a tuple, so reading 100k is cheap."""

    merchant_id: str
    seq: int
    release_json: str
    prev_hash: str
    entry_hash: str
    signature: str


def parse_row(row: LedgerRow) -> LedgerEntry:
    """Turn a stored row into an entry; IntegrityError names the bad field."""
    try:
        data = json.loads(row.release_json)
        release = PrivacyRelease.from_dict(data)
    except (ValueError, TypeError, ConfigError) as exc:
        raise IntegrityError(f"release_json: {exc}") from None
    # Hash and sign what is stored, byte for byte: skipping a re-serialisation keeps audits
    # fast, and stored text that is not canonical can only come from the key holder.
    release.__dict__["canonical_json"] = row.release_json
    if release.merchant_id != row.merchant_id:
        raise IntegrityError(
            f"merchant_id column {row.merchant_id!r} differs from the release's "
            f"{release.merchant_id!r}"
        )
    return LedgerEntry._build(row.seq, release, row.prev_hash, row.entry_hash, row.signature)


def chain_is_intact(
    rows: Sequence[LedgerRow], *, merchant_id: str, verify_key: Ed25519PublicKey | None
) -> bool:
    """Fast whole-chain check over the stored bytes, without parsing any release: numbering,
    merchant column, every ``entry_hash`` and link, and the signature of the LAST entry only.

    Sound because each ``prev_hash`` is the SHA-256 of the whole previous entry, signature
    included: the head's signed ``entry_hash`` commits to every earlier byte, so changing any
    earlier entry without the private key needs a SHA-256 collision or an Ed25519 forgery.
    False means "something is wrong somewhere": :func:`scan_chain` then names the entry."""
    prev = GENESIS_HASH
    for expected, row in enumerate(rows, start=1):
        member, seq, release_json, prev_hash, entry_hash, sig = row
        if member != merchant_id or type(seq) is not int or seq != expected or prev_hash != prev:
            return False
        if type(sig) is not str or not _HEX128.fullmatch(sig) or type(release_json) is not str:
            return False
        if not release_json.isascii():
            return False
        body = f'"prev_hash":"{prev}","release":{release_json},"seq":{seq}'
        if sha256_hex(b"%s{%s}" % (HASH_DOMAIN, body.encode("ascii"))) != entry_hash:
            return False
        text = f'{{"entry_hash":"{entry_hash}",{body},"signature":"{sig}"}}'
        prev = sha256_hex(text.encode("ascii"))
    if verify_key is None or not rows:
        return True
    head = rows[-1]
    try:
        verify_key.verify(bytes.fromhex(head.signature), bytes.fromhex(head.entry_hash))
    except InvalidSignature:
        return False
    return True


def scan_chain(
    rows: Iterable[LedgerRow],
    *,
    merchant_id: str,
    verify_key: Ed25519PublicKey | None,
) -> tuple[list[LedgerEntry], Finding | None]:
    """Check one merchant's rows (sorted by seq) entry by entry from the genesis, every
    signature included: the verified prefix and the first problem, if any."""
    entries: list[LedgerEntry] = []
    prev_hash = GENESIS_HASH
    for expected_seq, row in enumerate(rows, start=1):
        where = row.seq
        try:
            entry = parse_row(row)
        except IntegrityError as exc:
            return entries, Finding(merchant_id, where, str(exc))
        if entry.merchant_id != merchant_id:
            reason = f"entry names merchant {entry.merchant_id!r}, expected {merchant_id!r}"
            return entries, Finding(merchant_id, where, reason)
        if row.seq != expected_seq:
            reason = (
                f"seq {row.seq} found where seq {expected_seq} was expected "
                "(an entry was deleted, inserted or renumbered)"
            )
            return entries, Finding(merchant_id, expected_seq, reason)
        if entry.prev_hash != prev_hash:
            reason = "prev_hash does not match the previous entry (chain broken)"
            return entries, Finding(merchant_id, where, reason)
        problem = entry.problem(verify_key)
        if problem is not None:
            return entries, Finding(merchant_id, where, problem)
        entries.append(entry)
        prev_hash = entry.chain_hash()
    return entries, None


def verify_chain(
    rows: Iterable[LedgerRow],
    *,
    merchant_id: str,
    verify_key: Ed25519PublicKey | None,
    every_signature: bool = False,
) -> tuple[list[LedgerEntry], Finding | None]:
    """Check one merchant's rows (sorted by seq) from the genesis: the verified prefix and the
    first problem, if any. Without a key only hashes and chain links are checked.

    Every hash, link and release is checked; of the signatures only the head's unless
    ``every_signature`` (the head's covers the rest, see :func:`chain_is_intact`). When
    anything fails, the entry-by-entry :func:`scan_chain` names the first bad entry."""
    rows = list(rows)
    if not every_signature and chain_is_intact(
        rows, merchant_id=merchant_id, verify_key=verify_key
    ):
        try:
            return [parse_row(row) for row in rows], None
        except IntegrityError:
            pass  # a malformed release: the scan below names it
    return scan_chain(rows, merchant_id=merchant_id, verify_key=verify_key)


class ReleaseSummary(NamedTuple):
    """What the budget table needs from one verified release (a tuple: cheap in bulk)."""

    cohort: str
    privacy_unit: str
    delta: float
    epsilon_after: float
    epsilon_cap: float
    created_utc: str

    @classmethod
    def of(cls, release: PrivacyRelease) -> ReleaseSummary:
        return cls(
            release.cohort,
            release.privacy_unit.value,
            release.delta,
            release.epsilon_after,
            release.epsilon_cap,
            release.created_utc,
        )


class VerifiedChain(Sequence[LedgerEntry]):
    """One merchant's verified entries in order. Holds the stored rows and a summary per
    release; the :class:`LedgerEntry` objects are built on first use (an audit of 100,000
    entries that only needs budgets never builds them)."""

    def __init__(
        self,
        rows: Sequence[LedgerRow],
        summaries: Sequence[ReleaseSummary],
        entries: list[LedgerEntry] | None = None,
    ) -> None:
        if len(rows) != len(summaries) or (entries is not None and len(entries) != len(rows)):
            raise ValueError("rows, summaries and entries must have the same length")
        self.rows = tuple(rows)
        self.summaries = tuple(summaries)
        self._entries = entries

    @classmethod
    def of_entries(cls, rows: Sequence[LedgerRow], entries: list[LedgerEntry]) -> VerifiedChain:
        """The chain of already parsed ``entries`` (the first ``len(entries)`` rows)."""
        summaries = [ReleaseSummary.of(e.release) for e in entries]
        return cls(rows[: len(entries)], summaries, list(entries))

    def _parsed(self) -> list[LedgerEntry]:
        if self._entries is None:
            self._entries = [parse_row(row) for row in self.rows]
        return self._entries

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> LedgerEntry: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[LedgerEntry]: ...
    def __getitem__(self, index: int | slice) -> LedgerEntry | Sequence[LedgerEntry]:
        return self._parsed()[index]

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self._parsed())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VerifiedChain):
            return self.rows == other.rows
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"VerifiedChain({len(self)} entries)"


def _summarise(row: LedgerRow) -> ReleaseSummary:
    """Check a stored release with exactly the rules of :func:`parse_row` (no dataclass is
    built: that halves the cost of auditing), keeping only what the budget table needs."""
    try:
        values = _release_values(json.loads(row.release_json))
        floats = _check_release(values)
    except (ValueError, TypeError, ConfigError) as exc:
        raise IntegrityError(f"release_json: {exc}") from None
    if values["merchant_id"] != row.merchant_id:
        raise IntegrityError("merchant_id column differs from the release's")
    return ReleaseSummary(
        values["cohort"],
        values["privacy_unit"].value,
        floats["delta"],
        floats["epsilon_after"],
        floats["epsilon_cap"],
        values["created_utc"],
    )


def verify_rows(
    rows: Sequence[LedgerRow],
    *,
    merchant_id: str,
    verify_key: Ed25519PublicKey | None,
    every_signature: bool = False,
) -> tuple[VerifiedChain, Finding | None]:
    """:func:`verify_chain` for auditors: the same checks and findings, but the verified
    prefix comes back as a lazily parsed :class:`VerifiedChain`."""
    rows = list(rows)
    if not every_signature and chain_is_intact(
        rows, merchant_id=merchant_id, verify_key=verify_key
    ):
        try:
            return VerifiedChain(rows, [_summarise(row) for row in rows]), None
        except IntegrityError:
            pass  # a malformed release: the scan below names it
    entries, finding = scan_chain(rows, merchant_id=merchant_id, verify_key=verify_key)
    return VerifiedChain.of_entries(rows, entries), finding


def check_cohort_consistency(previous: Sequence[LedgerEntry], new: LedgerEntry) -> None:
    """A cohort keeps one delta, privacy unit and accountant, so its epsilons compose."""
    for old in previous:
        if old.release.cohort != new.release.cohort:
            continue
        for name in ("delta", "privacy_unit", "accountant"):
            if getattr(old.release, name) != getattr(new.release, name):
                raise ConfigError(
                    f"{name} {getattr(new.release, name)!r} differs from "
                    f"{getattr(old.release, name)!r} used earlier for cohort "
                    f"{new.release.cohort!r} (seq {old.seq}); use a new cohort name"
                )
        return


# --------------------------------------------------------------------------- SQLite storage

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
    problem = _schema_problem(conn)
    if problem is not None:
        raise IntegrityError(f"ledger {path}: {problem}")
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
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
        raise ConfigError(
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


# --------------------------------------------------------------------------- merchant side


class MerchantLedger(_Closable):
    """A merchant's own append-only ledger; every release is appended here before sending."""

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        *,
        merchant_id: str,
        signing_key: Ed25519PrivateKey,
        entries: list[LedgerEntry],
    ) -> None:
        self.path = Path(path)
        self.merchant_id = merchant_id
        self._conn = conn
        self._key = signing_key
        self._entries = entries

    @classmethod
    def open(
        cls, path: Path, *, merchant_id: str, signing_key: Ed25519PrivateKey
    ) -> MerchantLedger:
        """Open (creating if absent) and verify the whole chain with the key's public half."""
        if not NAME_PATTERN.fullmatch(merchant_id):
            raise ConfigError(f"merchant_id {merchant_id!r} is not a valid merchant name")
        conn, data = _open_store(Path(path), kind=KIND_MERCHANT, merchant_id=merchant_id)
        groups = data.by_merchant()
        stray = sorted(set(groups) - {merchant_id})
        if stray:
            conn.close()
            raise IntegrityError(f"ledger {path}: holds entries of other merchants {stray}")
        entries, finding = verify_chain(
            groups.get(merchant_id, []),
            merchant_id=merchant_id,
            verify_key=signing_key.public_key(),
        )
        if finding is not None:
            conn.close()
            raise IntegrityError(f"ledger {path}: {finding}")
        return cls(path, conn, merchant_id=merchant_id, signing_key=signing_key, entries=entries)

    @property
    def last_seq(self) -> int:
        return self._entries[-1].seq if self._entries else 0

    def append(self, release: PrivacyRelease) -> LedgerEntry:
        """Sign and durably store ``release``; on any error nothing was written."""
        conn = self._live()
        if not isinstance(release, PrivacyRelease):
            raise ConfigError(f"append needs a PrivacyRelease, got {type(release).__name__}")
        if release.merchant_id != self.merchant_id:
            raise ConfigError(
                f"release merchant_id {release.merchant_id!r} is not this ledger's "
                f"{self.merchant_id!r}"
            )
        if release.epsilon_after > release.epsilon_cap:
            raise PrivacyBudgetExceededError(
                f"epsilon_after {release.epsilon_after} exceeds epsilon_cap "
                f"{release.epsilon_cap} for cohort {release.cohort!r}; nothing was recorded"
            )
        seq = self.last_seq + 1
        prev_hash = self._entries[-1].chain_hash() if self._entries else GENESIS_HASH
        entry = seal(release, seq=seq, prev_hash=prev_hash, signing_key=self._key)
        check_cohort_consistency(self._entries, entry)
        _insert(conn, self.path, [entry])
        self._entries.append(entry)
        return entry

    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    def entries_after(self, seq: int) -> list[LedgerEntry]:
        """Entries with a sequence number above ``seq`` (the backlog a server lacks)."""
        return [e for e in self._entries if e.seq > seq]

    def history(self, cohort: str | None = None) -> list[MechanismStep]:
        """The cohort's mechanism history in order (all cohorts if None: customer-level)."""
        return [
            e.release.mechanism_step
            for e in self._entries
            if cohort is None or e.release.cohort == cohort
        ]

    def find(self, run_id: str, round: int) -> LedgerEntry | None:
        """The latest entry for ``(run_id, round)``, if any."""
        for entry in reversed(self._entries):
            if entry.release.run_id == run_id and entry.release.round == round:
                return entry
        return None


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class ExpectedRelease:
    """What the server asked of a merchant for one round (caps are upper bounds)."""

    run_id: str
    round: int
    model_in_sha256: str
    clipping_norm: float
    max_delta: float
    max_epsilon: float
    min_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        _check_token("run_id", self.run_id)
        _check_int("round", self.round, 1)
        _check_hex64("model_in_sha256", self.model_in_sha256)
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ConfigError(f"clipping_norm must be > 0, got {self.clipping_norm!r}")
        if not 0 < self.max_delta < 1:
            raise ConfigError(f"max_delta must be in (0, 1), got {self.max_delta!r}")
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ConfigError(f"max_epsilon must be > 0, got {self.max_epsilon!r}")
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise ConfigError(
                f"min_noise_multiplier must be >= 0, got {self.min_noise_multiplier!r}"
            )

    def mismatch(self, release: PrivacyRelease) -> str | None:
        """Why ``release`` is not what was asked for, or None."""
        checks: list[tuple[bool, str]] = [
            (release.run_id == self.run_id, f"run_id {release.run_id!r} != {self.run_id!r}"),
            (release.round == self.round, f"round {release.round} != {self.round}"),
            (
                release.model_in_sha256 == self.model_in_sha256,
                "model_in_sha256 is not the hash of the global model the server sent",
            ),
            (
                release.clipping_norm == self.clipping_norm,
                f"clipping_norm {release.clipping_norm} != {self.clipping_norm}",
            ),
            (release.delta <= self.max_delta, f"delta {release.delta} > max {self.max_delta}"),
            (
                release.epsilon_cap <= self.max_epsilon,
                f"epsilon_cap {release.epsilon_cap} > server's max_epsilon {self.max_epsilon}",
            ),
            (
                release.epsilon_after <= release.epsilon_cap,
                f"epsilon_after {release.epsilon_after} > epsilon_cap {release.epsilon_cap}",
            ),
            (
                release.noise_multiplier >= self.min_noise_multiplier,
                f"noise_multiplier {release.noise_multiplier} < min {self.min_noise_multiplier}",
            ),
        ]
        for ok, reason in checks:
            if not ok:
                return reason
        return None


class ServerLedger(_Closable):
    """The server's copy of every merchant's entries, each accepted only after verification."""

    def __init__(self, path: Path, conn: sqlite3.Connection, entries: dict[str, list[LedgerEntry]]):
        self.path = Path(path)
        self._conn = conn
        self._entries = entries

    @classmethod
    def open(cls, path: Path) -> ServerLedger:
        """Open (creating if absent); checks every chain's hashes (signatures need keys:
        ``fedshop audit verify``)."""
        conn, data = _open_store(Path(path), kind=KIND_SERVER, merchant_id=None)
        entries: dict[str, list[LedgerEntry]] = {}
        for merchant_id, rows in data.by_merchant().items():
            chain, finding = verify_chain(rows, merchant_id=merchant_id, verify_key=None)
            if finding is not None:
                conn.close()
                raise IntegrityError(f"ledger {path}: {finding}")
            entries[merchant_id] = chain
        return cls(path, conn, entries)

    def merchants(self) -> list[str]:
        return sorted(self._entries)

    def last_seq(self, merchant_id: str) -> int:
        """The last seq held for ``merchant_id`` (0 if none): send it to the merchant so it
        can attach the backlog of entries the server lacks."""
        chain = self._entries.get(merchant_id, [])
        return chain[-1].seq if chain else 0

    def entries(self, merchant_id: str | None = None) -> list[LedgerEntry]:
        if merchant_id is not None:
            return list(self._entries.get(merchant_id, []))
        return [e for m in sorted(self._entries) for e in self._entries[m]]

    def history(self, merchant_id: str, cohort: str) -> list[MechanismStep]:
        return [
            e.release.mechanism_step
            for e in self._entries.get(merchant_id, [])
            if e.release.cohort == cohort
        ]

    def accept(
        self,
        wire: str,
        *,
        verify_key: Ed25519PublicKey,
        expected: ExpectedRelease,
        model_out_sha256: str,
        backlog: Sequence[str] = (),
        merchant_id: str | None = None,
    ) -> LedgerEntry:
        """Verify a merchant's entry (and the backlog of its earlier entries this server has
        not seen) and store them verbatim in one transaction. IntegrityError says why not.

        ``merchant_id`` is who the server believes sent the update (pass it: it binds the
        entry to the sender); ``backlog`` holds the sender's entries after
        :meth:`last_seq` that precede ``wire`` (e.g. a release whose sending crashed)."""
        conn = self._live()
        incoming = [LedgerEntry.from_wire(text) for text in (*backlog, wire)]
        entry = incoming[-1]
        merchant_id = entry.merchant_id if merchant_id is None else merchant_id
        new = self._continue_chain(incoming, merchant_id=merchant_id, verify_key=verify_key)
        reason = expected.mismatch(entry.release)
        if reason is None and entry.release.model_out_sha256 != model_out_sha256:
            reason = "model_out_sha256 is not the hash of the weights received"
        if reason is not None:
            raise IntegrityError(f"merchant {merchant_id} seq {entry.seq}: {reason}")
        if new:
            _insert(conn, self.path, new)
            self._entries.setdefault(merchant_id, []).extend(new)
        return entry

    def _continue_chain(
        self, incoming: Sequence[LedgerEntry], *, merchant_id: str, verify_key: Ed25519PublicKey
    ) -> list[LedgerEntry]:
        held = self._entries.get(merchant_id, [])
        chain = list(held)
        new: list[LedgerEntry] = []
        for entry in incoming:
            where = f"merchant {merchant_id} seq {entry.seq}"
            if entry.merchant_id != merchant_id:
                raise IntegrityError(f"{where}: entry names merchant {entry.merchant_id!r}")
            problem = entry.problem(verify_key)
            if problem is not None:
                raise IntegrityError(f"{where}: {problem}")
            if entry.seq <= len(held):
                if held[entry.seq - 1] != entry:
                    raise IntegrityError(
                        f"{where}: differs from the entry the server already holds (fork)"
                    )
                continue
            self._link(chain, entry, where)
            try:
                check_cohort_consistency(chain, entry)
            except ConfigError as exc:
                raise IntegrityError(f"{where}: {exc}") from None
            chain.append(entry)
            new.append(entry)
        return new

    @staticmethod
    def _link(chain: Sequence[LedgerEntry], entry: LedgerEntry, where: str) -> None:
        last_seq = chain[-1].seq if chain else 0
        if entry.seq != last_seq + 1:
            raise IntegrityError(
                f"{where}: server holds up to seq {last_seq}; attach the missing entries as backlog"
            )
        prev = chain[-1].chain_hash() if chain else GENESIS_HASH
        if entry.prev_hash != prev:
            raise IntegrityError(
                f"{where}: prev_hash does not continue the chain the server holds (fork)"
            )
