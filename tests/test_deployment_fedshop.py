"""The real fedshop apps over TLS: one SuperLink and three merchant SuperNodes as processes.

Skipped (with the reason) until the app's pyproject declares the run-config keys the
ServerApp needs in deployment; from then on they must pass.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.errors import DeploymentError
from simulations.commands.deploy import check_app_config_keys
from simulations.deployment.process import free_port

sys.path.insert(0, str(Path(__file__).parent / "support"))
import deploy_harness as h

RUN_KEYS = ["fedshop-config", "run-dir", "keys-dir", "server-ledger"]


def _skip_unless_app_ready() -> None:
    try:
        check_app_config_keys(h.REPO, RUN_KEYS)
    except DeploymentError as exc:
        pytest.skip(str(exc))


@dataclass
class Federation:
    root: Path
    layout: Any
    pki: h.Pki
    port: int
    merchants: list[str]

    def server_args(self) -> list[str]:
        layout = self.layout
        return [
            "server",
            "--certs",
            str(self.pki.server),
            "--state",
            str(self.root / "state"),
            "--port",
            str(self.port),
            "--app",
            str(h.REPO),
            "--run-config",
            str(layout.config),
            "--nodes-allowlist",
            str(self.pki.nodes),
            "--run-timeout",
            "900",
            "--set",
            f"run-dir={layout.root}",
            "--set",
            f"keys-dir={layout.keys}",
            "--set",
            f"server-ledger={layout.server / 'ledger.sqlite'}",
            "--expect",
            str(layout.root / "summary.json"),
        ]

    def client(self, name: str) -> subprocess.Popen[bytes]:
        args = [
            "client",
            "--config",
            str(self.layout.merchants / name / "merchant.toml"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--root-cert",
            str(self.pki.server / "ca.crt"),
            "--node-key",
            str(self.pki.nodes / f"{name}.node.key"),
        ]
        return h.start_fedshop(args, self.root / f"{name}.log", cwd=self.root)

    def ledger(self, name: str) -> Path:
        path: Path = self.layout.merchant_config(name).ledger_path
        return path


def _federation(tmp_path: Path, rounds: int) -> Federation:
    from common.config import RunConfig
    from simulations.provision import provision

    config = RunConfig.from_dict(
        {
            "data": {"source": "synthetic", "top_n": 3, "synthetic_events_per_merchant": 600},
            "federation": {"rounds": rounds, "min_merchants": 3},
            "evaluation": {"max_cases_per_merchant": 50},
        }
    )
    layout = provision(config, tmp_path / "run")
    merchants = layout.merchant_ids()
    pki = h.make_pki(tmp_path / "pki", merchants)
    return Federation(tmp_path, layout, pki, free_port(), merchants)


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
    """Signed releases in a ledger file (read-only peek while its merchant may be writing)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])


def _ledger_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return sum(db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables)


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
    assert counts[victim] >= 1


@pytest.mark.slow
def test_platform_killed_mid_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """kill -9 of the whole platform after round 1's checkpoint; the restarted platform
    resumes at round 2 with the same run id and the merchants' ledgers stay consistent."""
    import json

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
