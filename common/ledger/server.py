"""The server's side: what it asked of a merchant for one round, and its verified copy of
every merchant's entries."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.accounting import MechanismStep
from common.errors import ConfigError, IntegrityError
from common.ledger.chain import cohort_mismatch, verify_chain
from common.ledger.claims import claim_problem
from common.ledger.entry import GENESIS_HASH, LedgerEntry
from common.ledger.release import PrivacyRelease, _check_hex64, _check_int, _check_token
from common.ledger.store import KIND_SERVER, _Closable, _insert, _open_store


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
        merchant_id: str,
        backlog: Sequence[str] = (),
    ) -> LedgerEntry:
        """Verify a merchant's entry (and the backlog of its earlier entries this server has
        not seen) and store them verbatim in one transaction. IntegrityError says why not.

        ``merchant_id`` is who the server believes sent the update: it binds the entry to the
        sender. ``backlog`` holds the sender's entries after :meth:`last_seq` that precede
        ``wire`` (e.g. a release whose sending crashed). Every new entry's epsilon is
        recomputed from the merchant's history (common/ledger/claims.py)."""
        conn = self._live()
        incoming = [LedgerEntry.from_wire(text) for text in (*backlog, wire)]
        entry = incoming[-1]
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
            mismatch = cohort_mismatch(chain, entry)
            if mismatch is not None:
                raise IntegrityError(f"{where}: {mismatch}")
            claim = claim_problem(chain, entry)
            if claim is not None:
                raise IntegrityError(f"{where}: {claim}")
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
