"""Canonical JSON is the only serialisation behind hashes and signatures, and the ledger's
f-string fast path produces exactly its bytes for every release it could ever hash."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ledger_support import make_release

from common.canonical import canonical_json, canonical_json_text
from common.config import RunConfig
from common.errors import ConfigError
from common.ledger import HASH_DOMAIN, PrivacyRelease, seal, sha256_hex
from common.ledger.entry import chain_hash_of, entry_hash_of, hashed_fields


def test_canonical_bytes_are_sorted_compact_ascii() -> None:
    data = {"b": [1, 2.5, None, True], "a": {"é": 'x"y\\z\n', "ω": 0.1 + 0.2}}
    text = '{"a":{"\\u00e9":"x\\"y\\\\z\\n","\\u03c9":0.30000000000000004},"b":[1,2.5,null,true]}'
    assert canonical_json(data) == text.encode("ascii")
    assert canonical_json_text(data) == text
    assert json.loads(canonical_json(data)) == data


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_cannot_be_hashed(bad: float) -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": bad})


_HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
_TOKEN = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
_RELEASES = st.builds(
    make_release,
    merchant_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True),
    round=st.integers(1, 10**12),
    run_id=_TOKEN,
    cohort=_TOKEN,
    model_in_sha256=_HEX64,
    noise_multiplier=st.floats(0, 1e300),
    sample_rate=st.floats(1e-300, 1).filter(lambda q: q > 0),
    steps=st.integers(1, 10**15),
    clipping_norm=st.floats(1e-300, 1e300).filter(lambda c: c > 0),
    delta=st.floats(1e-300, 1, exclude_max=True).filter(lambda d: d > 0),
    dataset_size=st.integers(1, 10**15),
    epsilon_after=st.floats(0, 1e300),
    library_versions=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(
    release=_RELEASES,
    seq=st.integers(1, 10**12),
    prev_hash=_HEX64,
    entry_hash=_HEX64,
    signature=st.text("0123456789abcdef", min_size=128, max_size=128),
)
def test_ledger_fast_path_is_canonical_json(
    release: PrivacyRelease, seq: int, prev_hash: str, entry_hash: str, signature: str
) -> None:
    hashed: dict[str, Any] = {"prev_hash": prev_hash, "release": release.to_dict(), "seq": seq}
    assert release.canonical_json == canonical_json_text(release.to_dict())
    fields = hashed_fields(release.canonical_json, seq=seq, prev_hash=prev_hash)
    assert ("{" + fields + "}").encode("ascii") == canonical_json(hashed)
    assert entry_hash_of(fields) == sha256_hex(HASH_DOMAIN + canonical_json(hashed))
    whole = {**hashed, "entry_hash": entry_hash, "signature": signature}
    assert chain_hash_of(fields, entry_hash=entry_hash, signature=signature) == sha256_hex(
        canonical_json(whole)
    )


def test_sealed_entry_hashes_what_the_documentation_says() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    release = make_release(cohort='odd"cohort"\\name', library_versions={"ü": "1"})
    entry = seal(release, seq=3, prev_hash="f" * 64, signing_key=Ed25519PrivateKey.generate())
    body = canonical_json({"prev_hash": "f" * 64, "release": release.to_dict(), "seq": 3})
    assert entry.entry_hash == hashlib.sha256(HASH_DOMAIN + body).hexdigest()


def test_run_config_hash_is_unchanged_for_every_valid_config() -> None:
    """The bytes behind config_sha256 are what they were before canonical JSON was shared
    (json.dumps with sorted keys and compact separators; ASCII is the default)."""
    config = RunConfig.from_dict({"seed": 7, "privacy": {"epsilon_cap": 2.5}})
    legacy = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    assert config.sha256() == hashlib.sha256(legacy.encode("utf-8")).hexdigest()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", math.nan])
def test_non_finite_config_numbers_are_refused_at_parse(value: object) -> None:
    with pytest.raises(ConfigError, match=r"training\.momentum: expected a finite number"):
        RunConfig.from_dict({"training": {"momentum": value}})
