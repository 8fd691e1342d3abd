"""Verifying a merchant's chain of entries: a fast whole-chain check over the stored bytes,
an entry-by-entry scan that names the first bad entry, and the lazily parsed result auditors use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, overload

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.errors import IntegrityError
from common.ledger.entry import (
    _HEX128,
    GENESIS_HASH,
    LedgerEntry,
    LedgerRow,
    chain_hash_of,
    entry_hash_of,
    hashed_fields,
    parse_row,
)
from common.ledger.release import PrivacyRelease, _check_release, _release_values, received


@dataclass(frozen=True)
class Finding:
    """The first thing wrong in a ledger: where, and why."""

    merchant_id: str
    seq: int
    reason: str

    def __str__(self) -> str:
        return f"merchant {self.merchant_id} seq {self.seq}: {self.reason}"


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
        fields = hashed_fields(release_json, seq=seq, prev_hash=prev)
        if entry_hash_of(fields) != entry_hash:
            return False
        prev = chain_hash_of(fields, entry_hash=entry_hash, signature=sig)
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
    fail = received("release_json")
    try:
        data = json.loads(row.release_json)
    except ValueError as exc:
        raise fail(str(exc)) from None
    values = _release_values(data, fail)
    floats = _check_release(values, fail)
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


def cohort_mismatch(previous: Sequence[LedgerEntry], new: LedgerEntry) -> str | None:
    """Why ``new`` cannot join its cohort, or None: a cohort keeps one delta, privacy unit
    and accountant, so its epsilons compose."""
    for old in previous:
        if old.release.cohort != new.release.cohort:
            continue
        for name in ("delta", "privacy_unit", "accountant"):
            if getattr(old.release, name) != getattr(new.release, name):
                return (
                    f"{name} {getattr(new.release, name)!r} differs from "
                    f"{getattr(old.release, name)!r} used earlier for cohort "
                    f"{new.release.cohort!r} (seq {old.seq}); use a new cohort name"
                )
        return None
    return None
