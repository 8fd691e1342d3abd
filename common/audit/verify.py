"""Verify merchant and server ledger copies with the merchants' public keys.

One read of each file: every chain from its genesis (every hash, link and release; the
signature of each chain's head, which covers all earlier entries, or every signature on
request), then the server's copy against each merchant's: entries present in both are
compared byte for byte and verified once. The first problem is reported with the file,
merchant, sequence number and reason (an entry-by-entry scan names it).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.errors import ConfigError, IntegrityError
from common.keys import load_key_directory
from common.ledger import (
    KIND_MERCHANT,
    KIND_SERVER,
    Finding,
    LedgerRow,
    VerifiedChain,
    read_ledger_file,
    verify_rows,
)


@dataclass(frozen=True)
class Problem:
    """The first bad entry found: file, merchant, seq and why."""

    file: str
    merchant_id: str
    seq: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: merchant {self.merchant_id} seq {self.seq}: {self.reason}"


@dataclass
class AuditResult:
    """Verified chains (merchant copies preferred) and the verdict."""

    chains: dict[str, VerifiedChain] = field(default_factory=dict)
    problem: Problem | None = None
    pending: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    signatures_checked: bool = True
    every_signature: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def entries(self) -> int:
        return sum(len(chain) for chain in self.chains.values())

    @property
    def checked(self) -> str:
        """What was and was not checked, in one line (print it with the verdict)."""
        base = "every entry hash, chain link, sequence number and release field"
        if not self.signatures_checked:
            return f"{base}; signatures NOT checked (no keys given)"
        if self.every_signature:
            return f"{base}; every signature"
        return f"{base}; the signature of each chain's last entry, which covers every earlier entry"

    def raise_if_bad(self) -> None:
        if self.problem is not None:
            raise IntegrityError(f"ledger verification failed: {self.problem}")


def _verify(
    rows: Sequence[LedgerRow],
    merchant_id: str,
    keys: Mapping[str, Ed25519PublicKey] | None,
    every_signature: bool,
) -> tuple[VerifiedChain, Finding | None]:
    """verify_rows with the merchant's key; a structural problem is reported even when the
    key is missing (a missing key is a ConfigError: the auditor's input is incomplete)."""
    key = keys.get(merchant_id) if keys is not None else None
    chain, finding = verify_rows(
        rows, merchant_id=merchant_id, verify_key=key, every_signature=every_signature
    )
    if finding is None and keys is not None and key is None:
        raise ConfigError(f"no public key {merchant_id}.pub in the key directory")
    return chain, finding


def _row_key(row: LedgerRow) -> tuple[str, str, str, str]:
    return (row.release_json, row.prev_hash, row.entry_hash, row.signature)


def _differences(a: LedgerRow, b: LedgerRow) -> str:
    fields = [n for n in ("prev_hash", "entry_hash", "signature") if getattr(a, n) != getattr(b, n)]
    try:
        ra, rb = json.loads(a.release_json), json.loads(b.release_json)
        fields += [f"release.{k}" for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
    except ValueError:
        fields.append("release_json")
    return ", ".join(fields) or "stored bytes"


def _check_merchant_file(
    path: Path, keys: Mapping[str, Ed25519PublicKey] | None, result: AuditResult
) -> dict[str, list[LedgerRow]]:
    data = read_ledger_file(path)
    if data.kind != KIND_MERCHANT or data.merchant_id is None:
        raise ConfigError(f"{path} is a {data.kind} ledger; pass it with --server-ledger")
    merchant_id = data.merchant_id
    if merchant_id in result.chains:
        raise ConfigError(f"two ledger files for merchant {merchant_id} ({path})")
    groups = data.by_merchant()
    for other in sorted(set(groups) - {merchant_id}):
        reason = "entry of another merchant"
        result.problem = Problem(str(path), other, groups[other][0].seq, reason)
        return {}
    rows = groups.get(merchant_id, [])
    chain, finding = _verify(rows, merchant_id, keys, result.every_signature)
    result.chains[merchant_id] = chain
    if finding is not None:
        result.problem = Problem(str(path), finding.merchant_id, finding.seq, finding.reason)
    return {merchant_id: rows}


def _compare(
    path: Path, merchant_id: str, server_rows: Sequence[LedgerRow], own: Sequence[LedgerRow]
) -> Finding | None:
    if len(server_rows) <= len(own) and list(server_rows) == list(own[: len(server_rows)]):
        return None  # the usual case, compared in one go
    for index, row in enumerate(server_rows):
        if index >= len(own):
            return Finding(
                merchant_id,
                row.seq,
                "the server holds this entry but the merchant's ledger does not "
                "(merchant ledger truncated, or the entry was forged)",
            )
        if _row_key(row) != _row_key(own[index]) or row.seq != own[index].seq:
            return Finding(
                merchant_id,
                row.seq,
                f"merchant and server copies disagree ({_differences(own[index], row)})",
            )
    return None


def _check_server_file(
    path: Path,
    keys: Mapping[str, Ed25519PublicKey] | None,
    merchant_rows: Mapping[str, list[LedgerRow]],
    result: AuditResult,
) -> None:
    data = read_ledger_file(path)
    if data.kind != KIND_SERVER:
        raise ConfigError(f"{path} is a merchant ledger, not a server ledger")
    for merchant_id, rows in sorted(data.by_merchant().items()):
        own = merchant_rows.get(merchant_id)
        if own is not None and _compare(path, merchant_id, rows, own) is None:
            result.pending[merchant_id] = len(own) - len(rows)
            continue  # byte-identical to a verified merchant copy
        chain, finding = _verify(rows, merchant_id, keys, result.every_signature)
        if finding is None and own is not None:
            finding = _compare(path, merchant_id, rows, own)
        if finding is not None:
            result.problem = Problem(str(path), finding.merchant_id, finding.seq, finding.reason)
            return
        result.chains.setdefault(merchant_id, chain)
    for merchant_id, own in merchant_rows.items():
        result.pending.setdefault(merchant_id, len(own))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """An audit allocates about ten objects per entry and keeps none in a reference cycle;
    the cyclic collector would re-scan the growing heap many times (about 10 % of the time
    at 100,000 entries) for nothing. Reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def audit_ledgers(
    ledgers: Sequence[Path],
    *,
    keys_dir: Path | None,
    server_ledger: Path | None = None,
    every_signature: bool = False,
    on_file: Callable[[], None] | None = None,
) -> AuditResult:
    """Verify everything given; stops at the first problem. Without keys only hashes, links
    and releases are checked (``signatures_checked`` is then False). With keys each chain's
    head signature is checked (it covers the whole chain), or every signature when
    ``every_signature`` (slower: about 0.2 ms per entry). ``on_file`` is called after each
    file is checked (a progress display)."""
    keys = load_key_directory(keys_dir) if keys_dir is not None else None
    result = AuditResult(signatures_checked=keys is not None, every_signature=every_signature)
    if not ledgers and server_ledger is None:
        raise ConfigError("give at least one --ledger FILE or --server-ledger FILE")
    with _collector_paused():
        _audit_files(ledgers, keys, server_ledger, result, on_file or (lambda: None))
    return result


def _audit_files(
    ledgers: Sequence[Path],
    keys: Mapping[str, Ed25519PublicKey] | None,
    server_ledger: Path | None,
    result: AuditResult,
    on_file: Callable[[], None],
) -> None:
    merchant_rows: dict[str, list[LedgerRow]] = {}
    for path in ledgers:
        result.files.append(str(path))
        merchant_rows.update(_check_merchant_file(Path(path), keys, result))
        on_file()
        if result.problem is not None:
            return
    if server_ledger is not None:
        result.files.append(str(server_ledger))
        _check_server_file(Path(server_ledger), keys, merchant_rows, result)
        on_file()
