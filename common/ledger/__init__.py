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
entry's ``prev_hash`` is 64 zeros. Canonical JSON is :mod:`common.canonical`'s.

Modules, by concern: ``release`` (the schema and its validation), ``entry`` (hashing, sealing,
parsing a stored row), ``chain`` (verifying a merchant's chain), ``store`` (the SQLite file),
``merchant`` (:class:`MerchantLedger`) and ``server`` (:class:`ExpectedRelease`,
:class:`ServerLedger`). This package re-exports what callers import.
"""

from common.ledger.chain import (
    Finding,
    ReleaseSummary,
    VerifiedChain,
    _summarise,
    chain_is_intact,
    cohort_mismatch,
    scan_chain,
    verify_chain,
    verify_rows,
)
from common.ledger.claims import claim_problem, composes_with, composition_history
from common.ledger.entry import (
    GENESIS_HASH,
    HASH_DOMAIN,
    WIRE_FORMAT,
    LedgerEntry,
    LedgerRow,
    parse_row,
    seal,
    sha256_hex,
)
from common.ledger.merchant import MerchantLedger
from common.ledger.release import MECHANISM, NOISE_SOURCE, PrivacyRelease, utc_now_iso
from common.ledger.server import ExpectedRelease, ServerLedger
from common.ledger.store import (
    BUSY_TIMEOUT_S,
    KIND_MERCHANT,
    KIND_SERVER,
    LEDGER_FORMAT,
    LedgerFile,
    _insert,
    _open_store,
    read_ledger_file,
)

__all__ = [
    "BUSY_TIMEOUT_S",
    "GENESIS_HASH",
    "HASH_DOMAIN",
    "KIND_MERCHANT",
    "KIND_SERVER",
    "LEDGER_FORMAT",
    "MECHANISM",
    "NOISE_SOURCE",
    "WIRE_FORMAT",
    "ExpectedRelease",
    "Finding",
    "LedgerEntry",
    "LedgerFile",
    "LedgerRow",
    "MerchantLedger",
    "PrivacyRelease",
    "ReleaseSummary",
    "ServerLedger",
    "VerifiedChain",
    "_insert",
    "_open_store",
    "_summarise",
    "chain_is_intact",
    "claim_problem",
    "cohort_mismatch",
    "composes_with",
    "composition_history",
    "parse_row",
    "read_ledger_file",
    "scan_chain",
    "seal",
    "sha256_hex",
    "utc_now_iso",
    "verify_chain",
    "verify_rows",
]
