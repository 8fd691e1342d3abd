"""Fast whole-chain verification (hashes + the head's signature) agrees with the
entry-by-entry scan: it never accepts what the scan rejects, unless the key holder made it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ledger_support import make_release

from common.audit.budgets import budget_rows, epsilon_series
from common.audit.verify import AuditResult
from common.errors import IntegrityError
from common.ledger import (
    GENESIS_HASH,
    ExpectedRelease,
    LedgerEntry,
    LedgerRow,
    ReleaseSummary,
    ServerLedger,
    _summarise,
    chain_is_intact,
    parse_row,
    read_ledger_file,
    scan_chain,
    seal,
    verify_chain,
    verify_rows,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
ROUNDS = 5


def _row(entry: LedgerEntry) -> LedgerRow:
    return LedgerRow(
        entry.merchant_id,
        entry.seq,
        entry.release.canonical_json,
        entry.prev_hash,
        entry.entry_hash,
        entry.signature,
    )


def _chain(key: Ed25519PrivateKey = KEY, merchant_id: str = "m1") -> list[LedgerEntry]:
    entries, prev = [], GENESIS_HASH
    for r in range(1, ROUNDS + 1):
        cohort = "train:a" if r % 2 else "train:b"
        entry = seal(
            make_release(merchant_id, r, cohort=cohort), seq=r, prev_hash=prev, signing_key=key
        )
        entries.append(entry)
        prev = entry.chain_hash()
    return entries


ENTRIES = _chain()
ROWS = [_row(e) for e in ENTRIES]
VERIFY_KEY = KEY.public_key()


def _flip(text: str, index: int, char: str) -> str:
    index %= len(text)
    new = char if text[index] != char else ("0" if char != "0" else "1")
    return text[:index] + new + text[index + 1 :]


def _mutate(rows: list[LedgerRow], kind: str, index: int, pos: int, char: str) -> list[LedgerRow]:
    rows = list(rows)
    row = rows[index]
    if kind in ("release_json", "prev_hash", "entry_hash", "signature"):
        changed: dict[str, Any] = {kind: _flip(getattr(row, kind), pos, char)}
        rows[index] = row._replace(**changed)
    elif kind == "seq":
        rows[index] = row._replace(seq=row.seq + 1 + pos % 7)
    elif kind == "merchant_id":
        rows[index] = row._replace(merchant_id="m2")
    elif kind == "delete":
        del rows[index]
    elif kind == "swap":
        other = (index + 1 + pos) % len(rows)
        rows[index], rows[other] = rows[other], rows[index]
    elif kind == "duplicate":
        rows.insert(index, row)
    return rows


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(
        [
            "release_json",
            "prev_hash",
            "entry_hash",
            "signature",
            "seq",
            "merchant_id",
            "delete",
            "swap",
            "duplicate",
        ]
    ),
    index=st.integers(0, ROUNDS - 1),
    pos=st.integers(0, 10_000),
    char=st.sampled_from(list('0123456789abcdef"{},:.eE-+ \\xZ')),
    with_key=st.booleans(),
)
def test_fast_path_never_accepts_what_the_scan_rejects(
    kind: str, index: int, pos: int, char: str, with_key: bool
) -> None:
    rows = _mutate(ROWS, kind, index, pos, char)
    key = VERIFY_KEY if with_key else None
    scanned, finding = scan_chain(rows, merchant_id="m1", verify_key=key)
    if finding is not None:
        assert not chain_is_intact(rows, merchant_id="m1", verify_key=key)
    # Whatever the path taken, the verdict and the named entry are the scan's.
    assert verify_chain(rows, merchant_id="m1", verify_key=key) == (scanned, finding)
    chain, fast_finding = verify_rows(rows, merchant_id="m1", verify_key=key)
    assert fast_finding == finding and list(chain) == scanned


def test_deleting_the_tail_is_the_documented_undetectable_case() -> None:
    for keep in range(ROUNDS + 1):
        assert chain_is_intact(ROWS[:keep], merchant_id="m1", verify_key=VERIFY_KEY)


def test_clean_chain_fast_and_full_agree() -> None:
    assert chain_is_intact(ROWS, merchant_id="m1", verify_key=VERIFY_KEY)
    assert verify_chain(ROWS, merchant_id="m1", verify_key=VERIFY_KEY) == (ENTRIES, None)
    assert verify_chain(ROWS, merchant_id="m1", verify_key=VERIFY_KEY, every_signature=True) == (
        ENTRIES,
        None,
    )
    assert not chain_is_intact(ROWS, merchant_id="m1", verify_key=OTHER_KEY.public_key())
    _, finding = verify_chain(ROWS, merchant_id="m1", verify_key=OTHER_KEY.public_key())
    assert finding is not None and finding.seq == 1 and "signature" in finding.reason


def test_a_bad_inner_signature_needs_the_key_and_every_signature_finds_it() -> None:
    """Only the key holder can make a chain whose head verifies around a bad inner signature
    (the head's signature covers the inner one); ``every_signature`` still reports it."""
    entries, prev = [], GENESIS_HASH
    for r in range(1, ROUNDS + 1):
        entry = seal(make_release("m1", r), seq=r, prev_hash=prev, signing_key=KEY)
        if r == 2:
            entry = LedgerEntry(entry.seq, entry.release, prev, entry.entry_hash, "0" * 128)
        entries.append(entry)
        prev = entry.chain_hash()
    rows = [_row(e) for e in entries]
    assert chain_is_intact(rows, merchant_id="m1", verify_key=VERIFY_KEY)
    _, finding = verify_chain(rows, merchant_id="m1", verify_key=VERIFY_KEY, every_signature=True)
    assert finding is not None and finding.seq == 2
    assert "signature does not verify" in finding.reason
    _, finding = verify_rows(rows, merchant_id="m1", verify_key=VERIFY_KEY, every_signature=True)
    assert finding is not None and finding.seq == 2


BAD_VALUES: dict[str, list[Any]] = {
    "merchant_id": ["m2", "../x", 5],
    "run_id": ["", "a b", None],
    "round": [0, 1.5, True, "3"],
    "model_in_sha256": ["A" * 64, "a" * 63],
    "cohort": ["", 7],
    "privacy_unit": ["EVENT", "record", [1]],
    "mechanism": ["laplace"],
    "noise_multiplier": [-0.1, "1", True, 10**400, None],
    "sample_rate": [0, 1.5, 0.5],
    "steps": [0, -1, 2.0],
    "clipping_norm": [0, -1.0, 2],
    "delta": [0, 1, 1e-3],
    "dataset_size": [0, False],
    "accountant": ["gdp", None],
    "epsilon_after": [-1.0, 3],
    "epsilon_cap": [0.0, 1e308],
    "config_sha256": ["c" * 65],
    "library_versions": [[], {"a": 1}, {}],
    "created_utc": ["2026-02-30T00:00:00Z", "2026-11-23T12:00:00+00:00", 0],
}


@settings(max_examples=200, deadline=None)
@given(
    changes=st.dictionaries(
        st.sampled_from(sorted(BAD_VALUES)), st.integers(0, 10), min_size=0, max_size=3
    ),
    drop=st.sampled_from([None, "steps", "cohort"]),
    extra=st.booleans(),
)
def test_bulk_summary_checks_exactly_what_parse_row_checks(
    changes: dict[str, int], drop: str | None, extra: bool
) -> None:
    data = json.loads(ENTRIES[2].release.canonical_json)
    for name, choice in changes.items():
        data[name] = BAD_VALUES[name][choice % len(BAD_VALUES[name])]
    if drop is not None:
        del data[drop]
    if extra:
        data["surprise"] = 1
    row = ROWS[2]._replace(release_json=json.dumps(data))
    try:
        expected = ReleaseSummary.of(parse_row(row).release)
    except IntegrityError:
        with pytest.raises(IntegrityError):
            _summarise(row)
        return
    assert _summarise(row) == expected


def test_verified_chain_is_lazy_and_behaves_like_the_entry_list() -> None:
    chain, finding = verify_rows(ROWS, merchant_id="m1", verify_key=VERIFY_KEY)
    assert finding is None and len(chain) == ROUNDS
    assert budget_rows({"m1": chain}) == budget_rows({"m1": ENTRIES})
    assert epsilon_series(chain) == epsilon_series(ENTRIES)
    assert chain._entries is None  # the table needed no parsed entries
    assert chain == ENTRIES and chain[1] == ENTRIES[1] and list(chain[1:3]) == ENTRIES[1:3]
    assert [e.seq for e in chain] == [1, 2, 3, 4, 5]
    rows = budget_rows({"m1": chain})
    # the budget is the last stated epsilon of each cohort: rounds 5 (train:a) and 4 (train:b)
    assert [(r.cohort, r.releases, r.spent) for r in rows] == [
        ("train:a", 3, ENTRIES[4].release.epsilon_after),
        ("train:b", 2, ENTRIES[3].release.epsilon_after),
    ]


def test_audit_result_says_what_was_checked() -> None:
    assert "NOT checked" in AuditResult(signatures_checked=False).checked
    assert "last entry" in AuditResult().checked
    assert "every signature" in AuditResult(every_signature=True).checked


def test_reading_interleaved_server_rows_sorts_by_merchant_and_seq(tmp_path: Path) -> None:
    path = tmp_path / "server.sqlite"
    chains = {"m2": _chain(OTHER_KEY, "m2"), "m1": ENTRIES}
    keys = {"m1": VERIFY_KEY, "m2": OTHER_KEY.public_key()}
    with ServerLedger.open(path) as server:
        for r in range(ROUNDS):
            for merchant_id in ("m2", "m1"):
                entry = chains[merchant_id][r]
                release = entry.release
                server.accept(
                    entry.to_wire(),
                    merchant_id=merchant_id,
                    verify_key=keys[merchant_id],
                    expected=ExpectedRelease(
                        run_id=release.run_id,
                        round=release.round,
                        model_in_sha256=release.model_in_sha256,
                        clipping_norm=release.clipping_norm,
                        max_delta=1e-5,
                        max_epsilon=8.0,
                    ),
                    model_out_sha256=release.model_out_sha256,
                )
    data = read_ledger_file(path)
    assert [(r.merchant_id, r.seq) for r in data.rows] == sorted(
        (m, s) for m in ("m1", "m2") for s in range(1, ROUNDS + 1)
    )
    with ServerLedger.open(path) as reopened:
        assert reopened.entries("m1") == ENTRIES


def test_a_non_text_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "server.sqlite"
    ServerLedger.open(path).close()
    conn = sqlite3.connect(path)
    rows = [_row(e) for e in ENTRIES[:2]]
    conn.executemany(
        "INSERT INTO entries (merchant_id, seq, release_json, prev_hash, entry_hash, signature) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [rows[0], (*rows[1][:5], b"\x00" * 64)],
    )
    conn.commit()
    conn.close()
    with pytest.raises(IntegrityError, match="merchant 'm1' seq 2: a column holds a non-text"):
        read_ledger_file(path)
