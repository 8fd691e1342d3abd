"""The real fedshop apps over TLS: one SuperLink and three merchant SuperNodes as processes.

An app whose pyproject lacks a run-config key the ServerApp needs in deployment fails these
tests (it would fail every real deployment), naming the key.
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
from simulations.deployment.flower import FlwrCli, wait_nodes_online

sys.path.insert(0, str(Path(__file__).parent / "support"))
import deploy_harness as h

RUN_KEYS = ["fedshop-config", "run-dir", "keys-dir", "server-ledger"]


def _require_app_ready() -> None:
    try:
        check_app_config_keys(h.REPO, RUN_KEYS)
    except DeploymentError as exc:
        pytest.fail(f"the fedshop app is not deployable: {exc}")


Federation = h.FedshopDeployment


def _federation(tmp_path: Path, rounds: int) -> Federation:
    return h.provision_deployment(
        tmp_path,
        {
            "data": {"source": "synthetic", "top_n": 3, "synthetic_events_per_merchant": 600},
            # a round that hangs fails the test in minutes, not at pytest's timeout
            "federation": {"rounds": rounds, "min_merchants": 3, "round_timeout_s": 300},
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


def _wait_run(cli: FlwrCli, run_id: int, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(cli.run_info(run_id).get("status", ""))
        if status.startswith("finished"):
            return status
        time.sleep(2.0)
    raise AssertionError(f"run {run_id} did not finish in {timeout:.0f} s")


@pytest.mark.slow
def test_merchants_run_only_their_pinned_app_behind_a_closed_control_port(tmp_path: Path) -> None:
    """Three merchants over TLS. An app that impersonates fedshop but ships a ClientApp that
    sends the merchant's events home is submitted through the Control API (as a compromised
    platform could): every merchant refuses it before any of its code runs, and no event
    leaves. The real fedshop run then trains with DP while a merchant, holding ca.crt and
    its node key, is refused every Control and Runtime API call on the merchant-facing port."""
    from simulations.deployment.runner import REFUSAL_MARK

    _require_app_ready()
    fed = _federation(tmp_path, rounds=2)
    server = h.start_fedshop(fed.serve_args(), tmp_path / "server.log", cwd=tmp_path)
    clients: list[subprocess.Popen[bytes]] = []
    cli = FlwrCli(fed.state / "flwr-home")
    try:
        fed.wait_superlink(server)
        clients = [fed.client(name) for name in fed.merchants]
        assert wait_nodes_online(cli, count=3, timeout=300) == 3
        evil_run = cli.start_run(h.make_evil_app(tmp_path), {"run-dir": str(fed.layout.root)})
        assert _wait_run(cli, evil_run, timeout=300) == "finished:completed"
        leak = json.loads((fed.layout.root / "leak.json").read_text())
        run_id = cli.start_run(h.REPO, fed.run_config())
        h.wait_for(
            lambda: (fed.layout.root / "checkpoints" / "round-0001.json").exists(),
            timeout=600,
            what="round 1",
            proc=server,
        )
        attempts = h.merchant_control_attempts(
            tmp_path / "merchant-flwr",
            fed.port,
            fed.pki.server / "ca.crt",
            fed.pki.nodes / f"{fed.merchants[0]}.node.key",
            app=h.REPO,
        )
        status = _wait_run(cli, run_id, timeout=900)
    finally:
        for proc in [server, *clients]:
            h.stop(proc)
    # The impersonating app: refused by each merchant, by name; nothing of it installed.
    assert len(leak) == 3 and not any("leaked_bytes" in entry for entry in leak), leak
    for name in fed.merchants:
        assert sum(f"merchant {name} {REFUSAL_MARK}" in e.get("error", "") for e in leak) == 1
        log = (tmp_path / f"{name}.log").read_text()
        assert f"REFUSED run {evil_run}" in log
        assert not list((fed.layout.merchants / name).glob(".flwr-*/apps"))
    # The control surface: closed to merchants while they trained.
    assert attempts and all(v == "refused" for v in attempts.values()), attempts
    # The real run: every merchant trained in every round; ledgers agree, and hold exactly
    # the real run's two releases (the refused run spent nothing).
    assert status == "finished:completed", (tmp_path / "server.log").read_text()[-3000:]
    summary = json.loads((fed.layout.root / "summary.json").read_text())
    rounds = json.loads((fed.layout.root / "metrics.json").read_text())["rounds"]
    assert summary["completed"] and [len(r["trained"]) for r in rounds] == [3, 3]
    assert _check_ledgers(fed) == dict.fromkeys(fed.merchants, 2)


@pytest.mark.slow
def test_merchant_killed_mid_round_rejoins_in_the_next_round_with_an_intact_ledger(
    tmp_path: Path,
) -> None:
    """kill -9 of a merchant's whole fedshop client mid-run, restarted at once: it signs its
    dead session off, is activated again within seconds, and is asked in the first round that
    starts after it is back (from the SuperLink's own record of messages and activations);
    its ledger keeps every release."""
    _require_app_ready()
    fed = _federation(tmp_path, rounds=4)
    victim = fed.merchants[0]
    server = h.start_fedshop(fed.server_args(), tmp_path / "server.log", cwd=tmp_path)
    clients: dict[str, subprocess.Popen[bytes]] = {}
    restarted = None
    with h.SuperLinkWatch(fed.state / "state.db") as watch:
        try:
            fed.wait_superlink(server)
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
    # Back under its old node id with a new activation time, soon after the restart.
    node = _node_id(tmp_path / f"{victim}.log")
    back = [datetime.fromisoformat(t) for t in watch.activations[node]]
    back_at = min(t for t in back if t > killed_at)
    assert (back_at - killed_at).total_seconds() < 45, (killed_at, back_at)
    assert "signed off the previous session" in (tmp_path / f"{victim}.log").read_text()
    # Asked in the first round that started after it was back, and it trained there.
    rounds = watch.rounds()
    assert len(rounds) == 4, rounds
    later = [i for i, (created, _) in enumerate(rounds) if created > back_at.timestamp()]
    assert later, (rounds, back_at)
    first = later[0]
    assert node in rounds[first][1], (rounds, node, back_at)
    history = json.loads((fed.layout.root / "metrics.json").read_text())["rounds"]
    assert victim in history[first]["trained"], history[first]


def _node_id(client_log: Path) -> int:
    import re

    found = re.findall(r"SuperNode ID: (-?\d+)", client_log.read_text())
    assert found, "the client never printed its node id"
    return int(found[-1])


@pytest.mark.slow
def test_platform_killed_mid_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """kill -9 of the whole platform after round 1's checkpoint; the restarted platform
    resumes at round 2 with the same run id and the merchants' ledgers stay consistent."""
    _require_app_ready()
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

    _require_app_ready()
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
