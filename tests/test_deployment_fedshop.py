"""The real fedshop apps over TLS: one SuperLink and three merchant SuperNodes as processes.

Skipped (with the reason) until the app's pyproject declares the run-config keys the
ServerApp needs in deployment; then it must pass.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import DeploymentError
from simulations.commands.deploy import check_app_config_keys
from simulations.deployment.process import free_port

sys.path.insert(0, str(Path(__file__).parent / "support"))
import deploy_harness as h

RUN_KEYS = ["fedshop-config", "run-dir", "keys-dir", "server-ledger"]


def _app_ready() -> str | None:
    try:
        check_app_config_keys(h.REPO, RUN_KEYS)
    except DeploymentError as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_three_merchants_train_with_dp_over_tls(tmp_path: Path) -> None:
    reason = _app_ready()
    if reason:
        pytest.skip(reason)
    from common.config import RunConfig
    from simulations.provision import provision

    config = RunConfig.from_dict(
        {
            "data": {"source": "synthetic", "top_n": 3, "synthetic_events_per_merchant": 600},
            "federation": {"rounds": 2, "min_merchants": 3},
            "evaluation": {"max_cases_per_merchant": 50},
        }
    )
    layout = provision(config, tmp_path / "run")
    merchants = layout.merchant_ids()
    assert len(merchants) == 3
    pki = h.make_pki(tmp_path / "pki", merchants)
    port = free_port()
    server_args = [
        "server",
        "--certs",
        str(pki.server),
        "--state",
        str(tmp_path / "state"),
        "--port",
        str(port),
        "--app",
        str(h.REPO),
        "--run-config",
        str(layout.config),
        "--nodes-allowlist",
        str(pki.nodes),
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
    server = h.start_fedshop(server_args, tmp_path / "server.log", cwd=tmp_path)
    clients: list[subprocess.Popen[bytes]] = []
    try:
        h.wait_for(
            lambda: (tmp_path / "state" / "nodes.json").exists(),
            timeout=120,
            what="SuperLink",
            proc=server,
        )
        for name in merchants:
            args = [
                "client",
                "--config",
                str(layout.merchants / name / "merchant.toml"),
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-cert",
                str(pki.server / "ca.crt"),
                "--node-key",
                str(pki.nodes / f"{name}.node.key"),
            ]
            clients.append(h.start_fedshop(args, tmp_path / f"{name}.log", cwd=tmp_path))
        code = server.wait(timeout=1200)
    finally:
        for proc in [server, *clients]:
            h.stop(proc)
    assert code == 0, (tmp_path / "server.log").read_text()[-4000:]
    for name in merchants:
        ledger = layout.merchant_config(name).ledger_path
        assert ledger.is_file(), f"{name} has no ledger"
        with sqlite3.connect(ledger) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            rows = sum(db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables)
        assert rows > 0, f"{name}'s ledger is empty"
