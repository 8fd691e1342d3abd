"""The real fedshop apps over TLS: one SuperLink and three merchant SuperNodes as processes.

Skipped (with the reason) until the app's pyproject declares the run-config keys the
ServerApp needs in deployment; from then on they must pass.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from common.errors import DeploymentError
from simulations.commands.deploy import check_app_config_keys

sys.path.insert(0, str(Path(__file__).parent / "support"))
import deploy_harness as h

RUN_KEYS = ["fedshop-config", "run-dir", "keys-dir", "server-ledger"]


def _skip_unless_app_ready() -> None:
    try:
        check_app_config_keys(h.REPO, RUN_KEYS)
    except DeploymentError as exc:
        pytest.skip(str(exc))


Federation = h.FedshopDeployment


def _federation(tmp_path: Path, rounds: int) -> Federation:
    return h.provision_deployment(
        tmp_path,
        {
            "data": {"source": "synthetic", "top_n": 3, "synthetic_events_per_merchant": 600},
            # a round that hangs fails the test in minutes, not at pytest's timeout
            "federation": {"rounds": rounds, "min_merchants": 3, "round_timeout_s": 300},
            "evaluation": {"max_cases_per_merchant": 50},
        },
    )


def _check_ledgers(fed: Federation) -> dict[str, int]:
    """Every merchant's chain verifies, and every release the platform accepted is in the
    merchant's own ledger with the same hash: the budget is never under-counted."""
    from common.keys import load_signing_key
    from common.ledger import MerchantLedger, ServerLedger

    server = ServerLedger.open(fed.layout.server / "ledger.sqlite")
    counts = {}
    try:
        for name in fed.merchants:
            merchant = fed.layout.merchant_config(name)
            with MerchantLedger.open(
                merchant.ledger_path,
                merchant_id=name,
                signing_key=load_signing_key(merchant.signing_key),
            ) as own:
                mine = {e.entry_hash for e in own.entries()}
            accepted = {e.entry_hash for e in server.entries(name)}
            assert accepted <= mine, f"{name}: the platform holds releases its ledger lacks"
            counts[name] = len(mine)
    finally:
        server.close()
    return counts


def _releases(path: Path) -> int:
    """Signed releases in a ledger file (read-only peek while its merchant may be writing).

    The merchant creates the file before it commits the schema, so a peek in between
    sees a database with no tables yet: that is zero releases, not an error.
    """
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "entries" not in tables:
            return 0
        return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])


def _ledger_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return sum(db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables)


def _activation_times(state_db: Path) -> list[datetime]:
    """When the SuperLink last activated each node (its SQLite state, Flower 1.41 schema)."""
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT last_activated_at FROM node").fetchall()
    return [datetime.fromisoformat(r[0]) for r in rows if r[0]]


@pytest.mark.slow
def test_three_merchants_train_with_dp_over_tls(tmp_path: Path) -> None:
    _skip_unless_app_ready()
    fed = _federation(tmp_path, rounds=2)
    assert len(fed.merchants) == 3
    server = h.start_fedshop(fed.server_args(), tmp_path / "server.log", cwd=tmp_path)
    clients: list[subprocess.Popen[bytes]] = []
    try:
        h.wait_for(
            lambda: (tmp_path / "state" / "nodes.json").exists(),
            timeout=120,
            what="SuperLink",
            proc=server,
        )
        clients = [fed.client(name) for name in fed.merchants]
        code = server.wait(timeout=1200)
    finally:
        for proc in [server, *clients]:
            h.stop(proc)
    assert code == 0, (tmp_path / "server.log").read_text()[-4000:]
    import json

    summary = json.loads((fed.layout.root / "summary.json").read_text())
    rounds = json.loads((fed.layout.root / "metrics.json").read_text())["rounds"]
    assert summary["completed"] and [len(r["trained"]) for r in rounds] == [3, 3]
    assert _check_ledgers(fed) == dict.fromkeys(fed.merchants, 2)


@pytest.mark.slow
def test_merchant_killed_mid_round_keeps_an_intact_ledger(tmp_path: Path) -> None:
    _skip_unless_app_ready()
    fed = _federation(tmp_path, rounds=3)
    victim = fed.merchants[0]
    server = h.start_fedshop(fed.server_args(), tmp_path / "server.log", cwd=tmp_path)
    clients: dict[str, subprocess.Popen[bytes]] = {}
    restarted = None
    try:
        h.wait_for(
            lambda: (tmp_path / "state" / "nodes.json").exists(),
            timeout=120,
            what="SuperLink",
            proc=server,
        )
        clients = {name: fed.client(name) for name in fed.merchants}
        h.wait_for(
            lambda: fed.ledger(victim).exists() and _releases(fed.ledger(victim)) > 0,
            timeout=600,
            what="the first release",
            proc=server,
        )
        before = _ledger_rows(fed.ledger(victim))
        h.kill_tree(clients[victim])  # the merchant's machine dies mid-run
        killed_at = datetime.now(UTC)
        assert _ledger_rows(fed.ledger(victim)) >= before  # nothing recorded was lost
        restarted = fed.client(victim)
        code = server.wait(timeout=1500)
    finally:
        for proc in [server, *clients.values(), *([restarted] if restarted else [])]:
            h.stop(proc)
    log = (tmp_path / "server.log").read_text()
    assert code == 0, log[-4000:]
    assert _ledger_rows(fed.ledger(victim)) >= before
    counts = _check_ledgers(fed)
    assert counts[victim] >= 2
    # The restarted merchant rejoins (once the SuperLink has let its dead node go) and trains
    # in the last round.
    rounds = json.loads((fed.layout.root / "metrics.json").read_text())["rounds"]
    assert len(rounds[-1]["trained"]) == 3, rounds[-1]
    # It came back under its old node id with a new activation time, which is what the
    # platform watches to stop waiting for a message that died with the process.
    activated = _activation_times(tmp_path / "state" / "state.db")
    assert len(activated) == 3 and sum(t > killed_at for t in activated) == 1, activated


@pytest.mark.slow
def test_platform_killed_mid_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """kill -9 of the whole platform after round 1's checkpoint; the restarted platform
    resumes at round 2 with the same run id and the merchants' ledgers stay consistent."""
    _skip_unless_app_ready()
    fed = _federation(tmp_path, rounds=3)
    checkpoint = fed.layout.root / "checkpoints" / "round-0001.json"
    server = h.start_fedshop(fed.server_args(), tmp_path / "server.log", cwd=tmp_path)
    clients: list[subprocess.Popen[bytes]] = []
    restarted = None
    try:
        h.wait_for(
            lambda: (tmp_path / "state" / "nodes.json").exists(),
            timeout=120,
            what="SuperLink",
            proc=server,
        )
        clients = [fed.client(name) for name in fed.merchants]
        h.wait_for(checkpoint.exists, timeout=900, what="round 1's checkpoint", proc=server)
        run_id = (fed.layout.root / "run-id").read_text()
        h.kill_tree(server)
        assert not (fed.layout.root / "summary.json").exists()
        restarted = h.start_fedshop(fed.server_args(), tmp_path / "server2.log", cwd=tmp_path)
        code = restarted.wait(timeout=1500)
    finally:
        for proc in [server, *clients, *([restarted] if restarted else [])]:
            h.stop(proc)
    assert code == 0, (tmp_path / "server2.log").read_text()[-4000:]
    summary = json.loads((fed.layout.root / "summary.json").read_text())
    rounds = json.loads((fed.layout.root / "metrics.json").read_text())["rounds"]
    assert summary["completed"] and summary["run_id"] == run_id
    assert [r["round"] for r in rounds] == [1, 2, 3]
    counts = _check_ledgers(fed)
    assert all(n >= 3 for n in counts.values())


@pytest.mark.slow
def test_online_platform_promotes_a_version_trained_on_new_inbox_files(tmp_path: Path) -> None:
    """``fedshop server --online`` over TLS: after the offline round the merchants have nothing
    new and refuse; files dropped into their inboxes are trained on, the candidate is gated on
    the validation archive, promoted, and shows on the Prometheus endpoint."""
    import urllib.request

    from simulations.deployment.process import free_port
    from simulations.online import drop_file

    _skip_unless_app_ready()
    fed = _federation(tmp_path, rounds=1)
    h.enable_inboxes(fed)
    monitoring = free_port()
    online = h.write_online_toml(
        tmp_path / "online.toml",
        keys_dir=tmp_path / "platform",
        interval_s=2.0,
        max_rounds=4,
        min_merchants=2,
        gate_tolerance=1.0,  # this test is about the flow; the gate has its own tests
        monitoring_port=monitoring,
    )
    server, clients, registry = h.start_online(
        fed, online, verify_key=tmp_path / "platform" / "platform.pub", timeout=900
    )
    try:
        after = h.latest_round(registry)
        dropped = {}
        for name in fed.merchants:
            events = h.fresh_events(fed, name, shift_weeks=1, rows=200)
            drop_file(fed.layout.merchants / name / "inbox", "week-1.parquet", events)
            dropped[name] = time.time()
        arrivals = h.wait_for_arrivals(registry, dropped, after_round=after, timeout=600)
        with urllib.request.urlopen(f"http://127.0.0.1:{monitoring}/metrics", timeout=10) as r:
            scraped = r.read().decode()
        code = server.wait(timeout=600)
    finally:
        for proc in [server, *clients]:
            h.stop(proc)
    assert code == 0, (tmp_path / "server.log").read_text()[-4000:]
    served = [line for line in scraped.splitlines() if line.startswith("fedshop_promoted_version")]
    assert served and float(served[0].split()[-1]) >= max(a.version for a in arrivals), served
    for arrival in arrivals:
        assert arrival.round > after and 0 < arrival.seconds < 600
    counts = _check_ledgers(fed)
    assert all(n >= 2 for n in counts.values())  # the offline release and the stream cohort
