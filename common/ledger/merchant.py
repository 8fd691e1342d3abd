"""The merchant's own ledger: every release is signed and appended here before it is sent."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.accounting import MechanismStep
from common.errors import ConfigError, IntegrityError, PrivacyBudgetExceededError
from common.keys import NAME_PATTERN
from common.ledger.chain import cohort_mismatch, verify_chain
from common.ledger.entry import GENESIS_HASH, LedgerEntry, seal
from common.ledger.release import PrivacyRelease
from common.ledger.store import KIND_MERCHANT, _Closable, _insert, _open_store


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
        mismatch = cohort_mismatch(self._entries, entry)
        if mismatch is not None:
            raise ConfigError(mismatch)
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
