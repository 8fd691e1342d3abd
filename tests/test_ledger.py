"""The privacy ledger: canonical records, signed hash chain, durability, server acceptance."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ledger_support import COHORT, build_ledger, make_release, true_epsilons

from common.accounting import MechanismStep, PrivacyUnit
from common.canonical import canonical_json
from common.errors import ConfigError, IntegrityError, LedgerError, PrivacyBudgetExceededError
from common.keys import generate_keypair, load_signing_key, load_verify_key
from common.ledger import (
    GENESIS_HASH,
    HASH_DOMAIN,
    ExpectedRelease,
    LedgerEntry,
    MerchantLedger,
    PrivacyRelease,
    ServerLedger,
    sha256_hex,
)

ROOT = Path(__file__).resolve().parents[1]


def _expected(round: int = 1, **changes: object) -> ExpectedRelease:
    fields: dict[str, object] = dict(
        run_id="run-1",
        round=round,
        model_in_sha256="a" * 64,
        clipping_norm=1.0,
        max_delta=1e-5,
        max_epsilon=8.0,
        min_noise_multiplier=0.5,
    )
    fields.update(changes)
    return ExpectedRelease(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("round", 0),
        ("noise_multiplier", -0.1),
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("steps", 0),
        ("clipping_norm", 0.0),
        ("delta", 1.0),
        ("dataset_size", 0),
        ("epsilon_after", math.nan),
        ("epsilon_cap", 0.0),
        ("model_in_sha256", "A" * 64),
        ("mechanism", "laplace"),
        ("created_utc", "2026-11-23T12:00:00+00:00"),
        ("privacy_unit", "event"),
        ("merchant_id", "../x"),
        ("cohort", ""),
    ],
)
def test_release_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        make_release(**{field: value})  # type: ignore[arg-type]


def test_canonical_json_roundtrips_floats_exactly() -> None:
    release = make_release(noise_multiplier=0.1 + 0.2, sample_rate=1 / 3, clipping_norm=1)
    data = json.loads(release.canonical_json)
    assert data["noise_multiplier"] == 0.1 + 0.2 and data["sample_rate"] == 1 / 3
    assert data["clipping_norm"] == 1.0 and isinstance(release.clipping_norm, float)
    assert PrivacyRelease.from_dict(data) == release
    assert release.canonical_json.encode("ascii") == canonical_json(data)
    assert list(data) == sorted(data) and " " not in release.canonical_json


@settings(max_examples=50, deadline=None)
@given(
    sigma=st.floats(0, 50, allow_nan=False),
    q=st.floats(1e-9, 1, allow_nan=False),
    eps=st.floats(0, 1e6, allow_nan=False),
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
)
def test_release_json_roundtrip_property(sigma: float, q: float, eps: float, name: str) -> None:
    release = make_release(name, noise_multiplier=sigma, sample_rate=q, epsilon_after=eps)
    assert PrivacyRelease.from_dict(json.loads(release.canonical_json)) == release


def test_append_chains_signs_and_hashes_as_documented(tmp_path: Path) -> None:
    _, entries = build_ledger(tmp_path, "m1", 3)
    verify_key = load_verify_key(tmp_path / "keys" / "m1.pub")
    prev = GENESIS_HASH
    for seq, entry in enumerate(entries, start=1):
        body = canonical_json({"prev_hash": prev, "release": entry.release.to_dict(), "seq": seq})
        assert entry.seq == seq and entry.prev_hash == prev
        assert entry.entry_hash == sha256_hex(HASH_DOMAIN + body)
        verify_key.verify(bytes.fromhex(entry.signature), bytes.fromhex(entry.entry_hash))
        full = {k: v for k, v in json.loads(entry.to_wire()).items() if k != "format"}
        prev = sha256_hex(canonical_json(full))
        assert prev == entry.chain_hash()


def test_reopen_history_find_and_wire_roundtrip(tmp_path: Path) -> None:
    path, entries = build_ledger(tmp_path, "m1", 3)
    key = load_signing_key(tmp_path / "keys" / "m1.key")
    with MerchantLedger.open(path, merchant_id="m1", signing_key=key) as ledger:
        assert ledger.entries() == entries
        assert ledger.history(COHORT) == [MechanismStep(1.0, 0.0256, 39)] * 3
        assert ledger.history("other") == []
        found = ledger.find("run-1", 2)
        assert found is not None and found.seq == 2
        assert ledger.find("run-1", 9) is None
        assert ledger.entries_after(1) == entries[1:]
    for entry in entries:
        assert LedgerEntry.from_wire(entry.to_wire()) == entry


@pytest.mark.parametrize("openers", [2, 4])
def test_openers_racing_to_create_one_ledger_all_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openers: int
) -> None:
    """Threads open the same new ledger at once, on real SQLite locks. A barrier after each
    has found no ledger and connected makes every one of them go on to create the schema:
    whoever takes the write lock second must find it, not fail."""
    import common.ledger.store as ledger_store

    generate_keypair(tmp_path / "keys", name="m1")
    key = load_signing_key(tmp_path / "keys" / "m1.key")
    path = tmp_path / "m1.sqlite"
    barrier = threading.Barrier(openers, timeout=30)
    real_connect = ledger_store._connect

    def connect_then_wait(where: Path, *, read_only: bool) -> sqlite3.Connection:
        conn = real_connect(where, read_only=read_only)
        barrier.wait()
        return conn

    monkeypatch.setattr(ledger_store, "_connect", connect_then_wait)

    def open_new() -> int:
        with MerchantLedger.open(path, merchant_id="m1", signing_key=key) as ledger:
            return ledger.last_seq

    with ThreadPoolExecutor(openers) as pool:
        assert list(pool.map(lambda _: open_new(), range(openers))) == [0] * openers
    monkeypatch.undo()
    with MerchantLedger.open(path, merchant_id="m1", signing_key=key) as ledger:
        assert ledger.append(make_release(round=1)).seq == 1
    build_ledger(tmp_path / "alone", "m1", 0)  # the same ledger, created by a lone opener
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    alone = sqlite3.connect(tmp_path / "alone" / "m1.sqlite").execute(schema).fetchall()
    assert sqlite3.connect(path).execute(schema).fetchall() == alone


def test_append_refusals_write_nothing(tmp_path: Path) -> None:
    path, _ = build_ledger(tmp_path, "m1", 1)
    key = load_signing_key(tmp_path / "keys" / "m1.key")
    with MerchantLedger.open(path, merchant_id="m1", signing_key=key) as ledger:
        with pytest.raises(ConfigError, match="merchant_id"):
            ledger.append(make_release("m2", 2))
        with pytest.raises(PrivacyBudgetExceededError, match=r"epsilon_after 9\.0 exceeds"):
            ledger.append(make_release(round=2, epsilon_after=9.0))
        with pytest.raises(ConfigError, match="delta"):
            ledger.append(make_release(round=2, delta=1e-6))
        with pytest.raises(ConfigError, match="privacy_unit"):
            ledger.append(make_release(round=2, privacy_unit=PrivacyUnit.CUSTOMER))
        assert ledger.last_seq == 1
    rows = sqlite3.connect(path).execute("SELECT count(*) FROM entries").fetchone()[0]
    assert rows == 1


def test_io_failure_raises_ledger_error_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.ledger.store as ledger_store

    monkeypatch.setattr(ledger_store, "BUSY_TIMEOUT_S", 0.05)
    path, _ = build_ledger(tmp_path, "m1", 1)
    key = load_signing_key(tmp_path / "keys" / "m1.key")
    with MerchantLedger.open(path, merchant_id="m1", signing_key=key) as ledger:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(LedgerError, match="locked"):
            ledger.append(make_release(round=2))
        blocker.execute("ROLLBACK")
        blocker.close()
        assert ledger.last_seq == 1
        assert ledger.append(make_release(round=2)).seq == 2  # still usable afterwards


def test_triggers_refuse_update_and_delete(tmp_path: Path) -> None:
    path, _ = build_ledger(tmp_path, "m1", 2)
    conn = sqlite3.connect(path)
    for statement in (
        "UPDATE entries SET signature = 'x' WHERE seq = 1",
        "DELETE FROM entries WHERE seq = 2",
        "UPDATE meta SET value = 'server' WHERE key = 'kind'",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(statement)
    conn.close()


def _forge(path: Path, sql: str) -> None:
    """What an attacker with file access can do: drop the triggers and edit rows."""
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER entries_no_update")
    conn.execute("DROP TRIGGER entries_no_delete")
    conn.execute(sql)
    conn.executescript(
        "CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries "
        "BEGIN SELECT RAISE(ABORT, 'fedshop ledger is append-only'); END;"
        "CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries "
        "BEGIN SELECT RAISE(ABORT, 'fedshop ledger is append-only'); END;"
    )
    conn.commit()
    conn.close()


def test_open_detects_tampering(tmp_path: Path) -> None:
    path, entries = build_ledger(tmp_path, "m1", 3)
    key = load_signing_key(tmp_path / "keys" / "m1.key")
    stated = json.dumps(entries[1].release.epsilon_after)
    edited = entries[1].release.canonical_json.replace(
        f'"epsilon_after":{stated}', '"epsilon_after":0.1'
    )
    assert edited != entries[1].release.canonical_json
    _forge(path, f"UPDATE entries SET release_json = '{edited}' WHERE seq = 2")
    with pytest.raises(IntegrityError, match="seq 2: entry_hash does not match"):
        MerchantLedger.open(path, merchant_id="m1", signing_key=key)


def test_open_refuses_another_merchants_key(tmp_path: Path) -> None:
    path, _ = build_ledger(tmp_path, "m1", 2)
    other, _ = generate_keypair(tmp_path / "other", name="m1")
    with pytest.raises(IntegrityError, match="seq 1: signature does not verify"):
        MerchantLedger.open(path, merchant_id="m1", signing_key=load_signing_key(other))


_CRASH = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
sys.path.insert(0, sys.argv[4])
from pathlib import Path
from common.keys import load_signing_key
from common.ledger import MerchantLedger
from test_ledger_support import make_release
ledger = MerchantLedger.open(Path(sys.argv[1]), merchant_id="m1",
                             signing_key=load_signing_key(Path(sys.argv[2])))
entry = ledger.append(make_release(round=2))
print(entry.entry_hash, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_entry_survives_sigkill_right_after_append(tmp_path: Path) -> None:
    path, _ = build_ledger(tmp_path, "m1", 1)
    key_path = tmp_path / "keys" / "m1.key"
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(path), str(key_path), str(ROOT), str(ROOT / "tests")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    printed = proc.stdout.strip()
    with MerchantLedger.open(path, merchant_id="m1", signing_key=load_signing_key(key_path)) as led:
        assert [e.seq for e in led.entries()] == [1, 2]
        assert led.entries()[-1].entry_hash == printed


# --------------------------------------------------------------------------- server side


def _server_setup(tmp_path: Path, rounds: int = 3) -> tuple[ServerLedger, list[LedgerEntry]]:
    _, entries = build_ledger(tmp_path, "m1", rounds)
    return ServerLedger.open(tmp_path / "server.sqlite"), entries


def _accept(server: ServerLedger, entry: LedgerEntry, tmp_path: Path, **kw: object) -> LedgerEntry:
    params: dict[str, object] = dict(
        verify_key=load_verify_key(tmp_path / "keys" / "m1.pub"),
        expected=_expected(entry.release.round),
        model_out_sha256=entry.release.model_out_sha256,
        merchant_id="m1",
    )
    params.update(kw)
    return server.accept(entry.to_wire(), **params)  # type: ignore[arg-type]


def test_server_accepts_in_order_and_stores_verbatim(tmp_path: Path) -> None:
    server, entries = _server_setup(tmp_path)
    for entry in entries:
        assert _accept(server, entry, tmp_path) == entry
    assert _accept(server, entries[-1], tmp_path) == entries[-1]  # a re-send is idempotent
    server.close()
    with ServerLedger.open(tmp_path / "server.sqlite") as reopened:
        assert reopened.entries("m1") == entries and reopened.last_seq("m1") == 3
    merchant_rows = (
        sqlite3.connect(tmp_path / "m1.sqlite")
        .execute(
            "SELECT seq, release_json, prev_hash, entry_hash, signature FROM entries ORDER BY seq"
        )
        .fetchall()
    )
    server_rows = (
        sqlite3.connect(tmp_path / "server.sqlite")
        .execute(
            "SELECT seq, release_json, prev_hash, entry_hash, signature FROM entries ORDER BY seq"
        )
        .fetchall()
    )
    assert merchant_rows == server_rows


def test_server_gap_needs_backlog(tmp_path: Path) -> None:
    server, entries = _server_setup(tmp_path)
    _accept(server, entries[0], tmp_path)
    with pytest.raises(IntegrityError, match="server holds up to seq 1; attach"):
        _accept(server, entries[2], tmp_path)
    assert server.last_seq("m1") == 1
    _accept(server, entries[2], tmp_path, backlog=[entries[1].to_wire()])
    assert server.entries("m1") == entries


@pytest.mark.parametrize(
    ("changes", "model_out", "reason"),
    [
        ({"run_id": "run-2"}, None, "run_id"),
        ({"round": 2}, None, "round 1 != 2"),
        ({"model_in_sha256": "b" * 64}, None, "model_in_sha256"),
        ({"clipping_norm": 2.0}, None, "clipping_norm"),
        ({"max_delta": 1e-6}, None, "delta"),
        ({"max_epsilon": 4.0}, None, "epsilon_cap 8.0 > server's max_epsilon 4.0"),
        ({"min_noise_multiplier": 1.5}, None, "noise_multiplier 1.0 < min 1.5"),
        ({}, "f" * 64, "model_out_sha256 is not the hash of the weights received"),
    ],
)
def test_server_refuses_inconsistent_releases(
    tmp_path: Path, changes: dict[str, object], model_out: str | None, reason: str
) -> None:
    server, entries = _server_setup(tmp_path, 1)
    expected = _expected(**{"round": 1, **changes})  # type: ignore[arg-type]
    kwargs: dict[str, object] = {"expected": expected}
    if model_out is not None:
        kwargs["model_out_sha256"] = model_out
    with pytest.raises(IntegrityError, match=reason):
        _accept(server, entries[0], tmp_path, **kwargs)
    assert server.entries() == []


def test_server_refuses_forgeries(tmp_path: Path) -> None:
    server, entries = _server_setup(tmp_path, 2)
    wire = json.loads(entries[0].to_wire())
    wire["release"]["epsilon_after"] = 0.01
    with pytest.raises(IntegrityError, match="entry_hash does not match"):
        server.accept(
            json.dumps(wire),
            verify_key=load_verify_key(tmp_path / "keys" / "m1.pub"),
            expected=_expected(1),
            model_out_sha256=entries[0].release.model_out_sha256,
            merchant_id="m1",
        )
    _, other_pub = generate_keypair(tmp_path / "other", name="m1")
    with pytest.raises(IntegrityError, match="signature does not verify"):
        _accept(server, entries[0], tmp_path, verify_key=load_verify_key(other_pub))
    with pytest.raises(IntegrityError, match="entry names merchant 'm1'"):
        _accept(server, entries[0], tmp_path, merchant_id="m2")
    with pytest.raises(IntegrityError, match="unknown \\['extra'\\]"):
        server.accept(
            json.dumps({**json.loads(entries[0].to_wire()), "extra": 1}),
            verify_key=load_verify_key(tmp_path / "keys" / "m1.pub"),
            expected=_expected(1),
            model_out_sha256="0" * 64,
            merchant_id="m1",
        )
    assert server.entries() == []


def test_server_detects_fork_after_merchant_lost_its_ledger(tmp_path: Path) -> None:
    server, entries = _server_setup(tmp_path, 1)
    _accept(server, entries[0], tmp_path)
    (tmp_path / "m1.sqlite").unlink()  # the merchant "resets" its budget
    key = load_signing_key(tmp_path / "keys" / "m1.key")
    with MerchantLedger.open(tmp_path / "m1.sqlite", merchant_id="m1", signing_key=key) as led:
        later = "2026-12-01T00:00:00Z"
        fresh = [led.append(make_release(round=r, created_utc=later)) for r in (1, 2)]
    with pytest.raises(IntegrityError, match="differs from the entry the server already holds"):
        _accept(server, fresh[1], tmp_path, backlog=[fresh[0].to_wire()])


def test_server_open_detects_tampered_copy(tmp_path: Path) -> None:
    server, entries = _server_setup(tmp_path, 2)
    for entry in entries:
        _accept(server, entry, tmp_path)
    server.close()
    _forge(tmp_path / "server.sqlite", "DELETE FROM entries WHERE seq = 1")
    with pytest.raises(IntegrityError, match="seq 2 found where seq 1 was expected"):
        ServerLedger.open(tmp_path / "server.sqlite")


def test_wrong_kind_of_file_is_refused(tmp_path: Path) -> None:
    path, _ = build_ledger(tmp_path, "m1", 1)
    with pytest.raises(LedgerError, match="merchant ledger"):  # the wrong path, not tampering
        ServerLedger.open(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(IntegrityError, match=r"junk\.sqlite"):
        ServerLedger.open(junk)


def _signed(tmp_path: Path, releases: list[PrivacyRelease]) -> list[LedgerEntry]:
    """Entries a merchant signed with its own (valid) key: only the platform's recomputation
    can tell that their epsilon is wrong."""
    private, _ = generate_keypair(tmp_path / "keys", name="m1")
    with MerchantLedger.open(
        tmp_path / "m1.sqlite", merchant_id="m1", signing_key=load_signing_key(private)
    ) as ledger:
        return [ledger.append(release) for release in releases]


def test_server_recomputes_stated_epsilon_and_refuses_under_reporting(tmp_path: Path) -> None:
    entries = _signed(
        tmp_path,
        [make_release(round=1), make_release(round=2, epsilon_after=0.3)],  # true: ~1.29
    )
    server = ServerLedger.open(tmp_path / "server.sqlite")
    _accept(server, entries[0], tmp_path)
    with pytest.raises(IntegrityError, match=r"seq 2: states epsilon 0\.300000 but its history"):
        _accept(server, entries[1], tmp_path)
    assert [e.seq for e in server.entries()] == [1]


def test_server_refuses_a_low_rdp_figure_and_a_spend_that_goes_down(tmp_path: Path) -> None:
    pld_2, _ = true_epsilons(2)
    low_rdp = make_release(round=1, epsilon_rdp=0.01)
    with pytest.raises(IntegrityError, match=r"states RDP epsilon 0\.010000"):
        _accept(
            ServerLedger.open(tmp_path / "a.sqlite"),
            _signed(tmp_path / "a", [low_rdp])[0],
            tmp_path / "a",
        )
    # round 2 overstates (allowed: conservative), round 3 then states less than round 2
    entries = _signed(
        tmp_path / "b",
        [make_release(round=1), make_release(round=2, epsilon_after=5.0), make_release(round=3)],
    )
    server = ServerLedger.open(tmp_path / "b.sqlite")
    _accept(server, entries[0], tmp_path / "b")
    _accept(server, entries[1], tmp_path / "b")
    with pytest.raises(IntegrityError, match="spend never goes down"):
        _accept(server, entries[2], tmp_path / "b")
    assert pld_2 < 5.0
