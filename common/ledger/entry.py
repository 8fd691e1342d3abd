"""One signed, hash-chained ledger entry: hashing, sealing and parsing a stored row.

``entry_hash = sha256(DOMAIN + canonical({"prev_hash", "release", "seq"}))``, the signature is
Ed25519 over the 32 bytes of ``entry_hash``, and the next entry's ``prev_hash`` is
``sha256(canonical({"entry_hash", "prev_hash", "release", "seq", "signature"}))``; the first
entry's ``prev_hash`` is 64 zeros.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.canonical import canonical_json_text
from common.errors import IntegrityError
from common.ledger.release import _HEX64, PrivacyRelease

GENESIS_HASH = "0" * 64
WIRE_FORMAT = "fedshop-ledger-entry/1"
HASH_DOMAIN = b"fedshop-ledger-entry/1\n"

_HEX128 = re.compile(r"[0-9a-f]{128}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hashed_fields(release_json: str, *, seq: int, prev_hash: str) -> str:
    """The members ``"prev_hash","release","seq"`` of canonical JSON, built by f-string.

    The ledger's one fast path (an audit hashes every entry twice): ``release_json`` is
    already canonical text, hex digests and integers need no escaping, so wrapping these
    members in braces gives exactly :func:`common.canonical.canonical_json_text` of the dict
    (pinned by a property test)."""
    return f'"prev_hash":"{prev_hash}","release":{release_json},"seq":{seq}'


def entry_hash_of(fields: str) -> str:
    """``entry_hash`` from :func:`hashed_fields`: SHA-256 of the domain and the object."""
    return sha256_hex(b"%s{%s}" % (HASH_DOMAIN, fields.encode("ascii")))


def chain_hash_of(fields: str, *, entry_hash: str, signature: str) -> str:
    """The next entry's ``prev_hash``: SHA-256 of the whole entry, signature included."""
    text = f'{{"entry_hash":"{entry_hash}",{fields},"signature":"{signature}"}}'
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
        fields = hashed_fields(self.release.canonical_json, seq=self.seq, prev_hash=self.prev_hash)
        return chain_hash_of(fields, entry_hash=self.entry_hash, signature=self.signature)

    def to_wire(self) -> str:
        return canonical_json_text(
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
        release = PrivacyRelease.from_dict(data["release"], where="release")
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
        fields = hashed_fields(self.release.canonical_json, seq=self.seq, prev_hash=self.prev_hash)
        computed = entry_hash_of(fields)
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
    entry_hash = entry_hash_of(hashed_fields(release.canonical_json, seq=seq, prev_hash=prev_hash))
    signature = signing_key.sign(bytes.fromhex(entry_hash)).hex()
    return LedgerEntry(seq, release, prev_hash, entry_hash, signature)


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
    except ValueError as exc:
        raise IntegrityError(f"release_json: {exc}") from None
    release = PrivacyRelease.from_dict(data, where="release_json")
    # Hash and sign what is stored, byte for byte: skipping a re-serialisation keeps audits
    # fast, and stored text that is not canonical can only come from the key holder.
    release.__dict__["canonical_json"] = row.release_json
    if release.merchant_id != row.merchant_id:
        raise IntegrityError(
            f"merchant_id column {row.merchant_id!r} differs from the release's "
            f"{release.merchant_id!r}"
        )
    return LedgerEntry._build(row.seq, release, row.prev_hash, row.entry_hash, row.signature)
