"""Helpers for the loopback deployment tests: a PKI, a toy app, and ``fedshop`` processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import certs
from simulations.deployment.process import QUIET_FLOWER_ENV, descendants

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tests" / "support" / "deploy_cli.py"
TOYAPP = Path(__file__).with_name("deploy_toyapp.py")

TOY_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedshop-toyapp"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "fedshop"

[tool.flwr.app.components]
serverapp = "toyapp:server_app"
clientapp = "toyapp:client_app"

[tool.flwr.app.config]
fedshop-config = ""
"""


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Path
    nodes: Path
    other_ca: Path


def make_pki(root: Path, merchants: list[str]) -> Pki:
    pki = Pki(root / "ca", root / "server", root / "nodes", root / "other-ca")
    certs.init_ca(pki.ca)
    certs.init_ca(pki.other_ca, common_name="not the platform")
    certs.issue_server_cert(ca_dir=pki.ca, hosts=["127.0.0.1", "localhost"], out=pki.server)
    for name in merchants:
        certs.generate_node_key(out=pki.nodes, name=name)
    return pki


def make_toy_app(root: Path) -> Path:
    app = root / "toyapp-src"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(TOY_PYPROJECT, encoding="utf-8")
    (app / "toyapp.py").write_text(TOYAPP.read_text(encoding="utf-8"), encoding="utf-8")
    return app


def make_merchant(root: Path, name: str) -> Path:
    directory = root / "merchants" / name
    directory.mkdir(parents=True)
    config = directory / "merchant.toml"
    config.write_text(
        f'[merchant]\nid = "{name}"\ndata = "events.parquet"\nstate_dir = "state"\n'
        'signing_key = "ledger.key"\n',
        encoding="utf-8",
    )
    return config


def write_run_spec(path: Path, **spec: object) -> Path:
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def env() -> dict[str, str]:
    result = dict(os.environ)
    result.update(QUIET_FLOWER_ENV)
    result["PYTHONUNBUFFERED"] = "1"
    return result


def start_fedshop(args: list[str], log: Path, *, cwd: Path) -> subprocess.Popen[bytes]:
    """``fedshop ARGS`` in its own session, output to ``log``."""
    handle = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, str(CLI), *args],
            cwd=cwd,
            env=env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        handle.close()


def kill_tree(popen: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal a process and every descendant (a crash when ``sig`` is SIGKILL), then reap."""
    pids = [popen.pid, *descendants(popen.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=30)


def stop(popen: subprocess.Popen[bytes]) -> None:
    """Graceful stop (SIGTERM, as systemd does), then kill whatever is left."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=20)
    kill_tree(popen)


def wait_for(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``predicate``; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- the real fedshop apps on loopback ------------------------------------------------------


@dataclass
class FedshopDeployment:
    """A provisioned run, its PKI and the command lines of ``fedshop server`` / ``client``."""

    root: Path
    layout: Any  # simulations.provision.RunLayout
    pki: Pki
    port: int  # merchant-facing (nginx, Fleet API only)
    control_port: int  # the SuperLink's own port on 127.0.0.1 (Control API)
    merchants: list[str]

    @property
    def state(self) -> Path:
        return self.root / "state"

    def server_args(self, *extra: str) -> list[str]:
        layout = self.layout
        return [
            "server",
            "--certs",
            str(self.pki.server),
            "--state",
            str(self.state),
            "--port",
            str(self.port),
            "--control-port",
            str(self.control_port),
            "--app",
            str(REPO),
            "--config",
            str(layout.config),
            "--run-dir",
            str(layout.root),
            "--keys-dir",
            str(layout.keys),
            "--nodes-allowlist",
            str(self.pki.nodes),
            "--run-timeout",
            "900",
            "--flwr-config",
            f"server-ledger={layout.server / 'ledger.sqlite'}",
            *extra,
        ]

    def serve_args(self) -> list[str]:
        """``fedshop server`` that only serves: runs are submitted with ``flwr run``."""
        return [
            "server",
            "--certs",
            str(self.pki.server),
            "--state",
            str(self.state),
            "--port",
            str(self.port),
            "--control-port",
            str(self.control_port),
            "--nodes-allowlist",
            str(self.pki.nodes),
        ]

    def run_config(self) -> dict[str, str]:
        """What ``fedshop server --config ...`` submits, for a run submitted by hand."""
        layout = self.layout
        return {
            "fedshop-config": str(layout.config),
            "run-dir": str(layout.root),
            "keys-dir": str(layout.keys),
            "server-ledger": str(layout.server / "ledger.sqlite"),
        }

    def online_server_args(self, online_toml: Path) -> list[str]:
        """The platform running fine-tuning rounds after the offline ones (docs/online.md)."""
        return self.server_args(
            "--online",
            "--flwr-config",
            f"online-config={online_toml}",
        )

    def client(self, name: str) -> subprocess.Popen[bytes]:
        args = [
            "client",
            "--config",
            str(self.layout.merchants / name / "merchant.toml"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--ca-cert",
            str(self.pki.server / "ca.crt"),
            "--node-key",
            str(self.pki.nodes / f"{name}.node.key"),
        ]
        return start_fedshop(args, self.root / f"{name}.log", cwd=self.root)

    def ledger(self, name: str) -> Path:
        path: Path = self.layout.merchant_config(name).ledger_path
        return path

    def wait_superlink(self, server: subprocess.Popen[bytes], timeout: float = 120) -> None:
        wait_for(
            lambda: (self.state / "nodes.json").exists(),
            timeout=timeout,
            what="SuperLink",
            proc=server,
        )


def provision_deployment(root: Path, config: dict[str, Any]) -> FedshopDeployment:
    """Provision ``config`` under ``root/run`` with a PKI for its merchants and a free port."""
    from common.config import RunConfig
    from simulations.deployment.process import free_port
    from simulations.provision import provision

    layout = provision(RunConfig.from_dict(config), root / "run")
    merchants = layout.merchant_ids()
    pki = make_pki(root / "pki", merchants)
    return FedshopDeployment(root, layout, pki, free_port(), free_port(), merchants)


# -- online fine-tuning on loopback: inboxes, drops and freshness ---------------------------


def write_online_toml(path: Path, *, keys_dir: Path, **settings: Any) -> Path:
    """An ``online.toml`` with a platform key pair made up front (readers need the public key)."""
    from server.online import platform_keys

    private, public = platform_keys(keys_dir)
    lines = ["[online]", f'signing_key = "{private}"', f'verify_key = "{public}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def enable_inboxes(deployment: FedshopDeployment, *, stream_epsilon_cap: float = 1.0) -> None:
    """Each merchant watches ``merchants/NAME/inbox`` (files arrive by rename)."""
    from simulations.online import StreamSpec
    from simulations.online import enable_inboxes as enable

    enable(deployment.layout, StreamSpec(41, 53, stream_epsilon_cap=stream_epsilon_cap))


def fresh_events(deployment: FedshopDeployment, merchant: str, *, shift_weeks: int, rows: int):
    """``rows`` of the merchant's own events moved ``shift_weeks`` later: new content, same
    customers and products, so the file is a new cohort that passes validation."""
    import pandas as pd

    from common.events import read_events

    events = read_events(deployment.layout.merchant_config(merchant).data)
    sample = events.tail(rows).reset_index(drop=True)
    sample["timestamp"] = sample["timestamp"] + pd.Timedelta(weeks=shift_weeks)
    return sample


@dataclass(frozen=True)
class Arrival:
    """One inbox file and the first promoted model version trained on it."""

    merchant: str
    dropped_at: float  # POSIX seconds when the file was renamed into the inbox
    promoted_at: float  # POSIX seconds of the promotion, from the registry's own record
    version: int
    round: int

    @property
    def seconds(self) -> float:
        return self.promoted_at - self.dropped_at


def start_online(
    deployment: FedshopDeployment, online_toml: Path, *, verify_key: Path, timeout: float
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]], Any]:
    """Start the online platform and every merchant; return once the offline rounds are done
    and the registry exists (opened read-only). The caller stops the processes."""
    from common.keys import load_verify_key
    from server.registry import ModelRegistry

    root = deployment.root
    server = start_fedshop(
        deployment.online_server_args(online_toml), root / "server.log", cwd=root
    )
    clients: list[subprocess.Popen[bytes]] = []
    try:
        deployment.wait_superlink(server)
        clients = [deployment.client(name) for name in deployment.merchants]
        registry_dir = deployment.layout.root / "registry"
        wait_for(
            lambda: (registry_dir / "registry.sqlite").exists(),
            timeout=timeout,
            what="the offline model in the registry",
            proc=server,
        )
        registry = ModelRegistry(
            registry_dir, signing_key=None, verify_key=load_verify_key(verify_key)
        )
    except BaseException:
        for proc in [server, *clients]:
            stop(proc)
        raise
    return server, clients, registry


def latest_round(registry: Any) -> int:
    return max((v.round for v in registry.list()), default=0)


def wait_for_arrivals(
    registry: Any,
    dropped: dict[str, float],
    *,
    after_round: int,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
) -> list[Arrival]:
    """Poll the registry until, for every merchant in ``dropped``, a version with a round after
    ``after_round`` that this merchant trained in has been promoted.

    Before a drop the merchants have nothing new (they refuse with "no fresh data"), so any
    later version they contributed to was trained on the dropped file.
    """
    from datetime import datetime

    found: dict[str, Arrival] = {}

    def check() -> bool:
        promoted_at: dict[int, float] = {}
        for promotion in registry.history():
            if promotion.action.value == "promote":
                at = datetime.fromisoformat(promotion.at).timestamp()
                promoted_at.setdefault(promotion.version_id, at)
        for version in sorted(registry.list(), key=lambda v: v.id):
            if version.round <= after_round or version.id not in promoted_at:
                continue
            for merchant in version.merchants:
                if merchant in dropped and merchant not in found:
                    found[merchant] = Arrival(
                        merchant,
                        dropped[merchant],
                        promoted_at[version.id],
                        version.id,
                        version.round,
                    )
        return set(found) >= set(dropped)

    wait_for(check, timeout=timeout, what="promoted versions with the new files", proc=proc)
    return [found[m] for m in sorted(dropped)]


# -- the control surface, as a merchant and as the platform's operator -----------------------


def _flwr_json(home: Path, *args: str) -> dict[str, Any]:
    from simulations.deployment.process import flower_bin, flower_env

    done = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        payload: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"success": False, "error-message": (done.stderr or done.stdout)[-500:]}
    return payload


def _outcome(payload: dict[str, Any]) -> str:
    if payload.get("success"):
        return f"allowed: {payload}"
    message = str(payload.get("error-message", ""))
    return "refused" if "403" in message else f"failed otherwise: {message[-300:]}"


def merchant_control_attempts(
    home: Path, port: int, ca_cert: Path, node_key: Path, app: Path | None = None
) -> dict[str, str]:
    """What a merchant holding ``ca.crt`` and its node key gets from the platform's
    merchant-facing port when it tries the Control and Runtime APIs: ``refused`` (HTTP 403)
    for each attempt, or what happened instead."""
    from base64 import b64encode

    import httpx
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    from simulations.deployment.flower import write_connection_config

    write_connection_config(home, address=f"127.0.0.1:{port}", root_cert=ca_cert, name="platform")
    results = {
        "flwr ls": _outcome(_flwr_json(home, "ls", "platform")),
        "flwr supernode ls": _outcome(_flwr_json(home, "supernode", "ls", "platform")),
        "flwr supernode register": _outcome(
            _flwr_json(home, "supernode", "register", str(node_key.with_suffix(".pub")), "platform")
        ),
    }
    if app is not None:
        results["flwr run"] = _outcome(_flwr_json(home, "run", str(app), "platform"))
    key = certs.load_node_private_key(node_key)
    stamp = now().isoformat()
    headers = {
        "content-type": "application/protobuf",
        FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public_key_to_bytes(key.public_key())).decode(),
        TIMESTAMP_HEADER: stamp,
        FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(key, stamp.encode())).decode(),
    }
    with httpx.Client(verify=str(ca_cert), timeout=30) as client:
        for path in (
            "/v1/control/start-run",
            "/v1/control/list-nodes",
            "/v1/runtime/acquire-task",
            "/v1/runtime/pull-task-input",
        ):
            response = client.post(f"https://127.0.0.1:{port}{path}", content=b"", headers=headers)
            results[f"signed POST {path}"] = (
                "refused" if response.status_code == 403 else f"HTTP {response.status_code}"
            )
    return results


def operator_flwr_ls(flwr_home: Path) -> list[dict[str, Any]]:
    """``flwr ls`` on the platform host, through the connection ``fedshop server`` wrote."""
    payload = _flwr_json(flwr_home, "ls", "fedshop")
    assert payload.get("success"), payload
    return list(payload.get("runs", []))


# -- an app that is not the one merchants pinned ---------------------------------------------

EVIL_SERVERAPP = '''\
"""A ServerApp that asks every merchant for its raw events (what pinning must stop)."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = Path(str(context.run_config["run-dir"]))
    deadline = time.time() + 120
    while len(list(grid.get_node_ids())) < 3 and time.time() < deadline:
        time.sleep(0.5)
    messages = [
        Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=n,
                message_type="train")
        for n in sorted(grid.get_node_ids())
    ]
    outcome = []
    for reply in grid.send_and_receive(messages, timeout=120):
        entry = {"node": reply.metadata.src_node_id}
        if reply.has_error():
            entry["error"] = reply.error.reason
        else:
            leak = reply.content["leak"]
            entry["merchant"] = str(leak["merchant"])
            entry["leaked_bytes"] = len(leak["events"])
        outcome.append(entry)
    (run_dir / "leak.json").write_text(json.dumps(outcome))
'''

EVIL_CLIENTAPP = '''\
"""A ClientApp that puts the merchant's whole event file in its reply."""

import tomllib
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    merchant_toml = Path(str(context.node_config["merchant-config"]))
    merchant = tomllib.loads(merchant_toml.read_text())["merchant"]
    events = Path(merchant["data"]).read_bytes()
    leak = ConfigRecord({"merchant": merchant["id"], "events": events})
    return Message(RecordDict({"leak": leak}), reply_to=msg)
'''


def make_evil_app(root: Path) -> Path:
    """An app bundle that claims to be fedshop (same name, version and components) but whose
    ClientApp exfiltrates the merchant's events."""
    app = root / "evil-app"
    for package in ("server", "client"):
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text("")
    (app / "server" / "app.py").write_text(EVIL_SERVERAPP)
    (app / "client" / "app.py").write_text(EVIL_CLIENTAPP)
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    pyproject = pyproject.replace('"common/**/*.py", ', "")  # this app has no common/
    (app / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    return app


# -- what the SuperLink did, from its own database -------------------------------------------


def _uint64(value: int) -> int:
    """Node ids as SuperNodes print them (the database keeps them as signed 64-bit)."""
    return int(value) % 2**64


class SuperLinkWatch:
    """Polls the SuperLink's SQLite state (Flower 1.41 schema) while a run goes on: every
    message it was asked to deliver (destination, creation time) and every node activation.
    Flower deletes delivered messages, so this is the record of who was asked when."""

    def __init__(self, state_db: Path, interval: float = 0.2) -> None:
        import threading

        self.state_db = state_db
        self.interval = interval
        self.messages: dict[str, tuple[int, float, str]] = {}
        self.activations: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> SuperLinkWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _poll(self) -> None:
        import sqlite3

        while not self._stop.is_set():
            try:
                with sqlite3.connect(f"file:{self.state_db}?mode=ro", uri=True, timeout=1) as db:
                    for message_id, dst, created, kind in db.execute(
                        "SELECT message_id, dst_node_id, created_at, message_type FROM message_ins"
                    ):
                        self.messages.setdefault(
                            message_id, (_uint64(dst), float(created), str(kind))
                        )
                    for node, activated in db.execute(
                        "SELECT node_id, last_activated_at FROM node"
                    ):
                        if activated:
                            self.activations.setdefault(_uint64(node), set()).add(activated)
            except sqlite3.Error:
                pass  # not created yet, or locked for a moment
            self._stop.wait(self.interval)

    def rounds(self, message_type: str = "train", gap: float = 1.0) -> list[tuple[float, set[int]]]:
        """Messages of ``message_type`` grouped into rounds (a round's messages are created
        together): each round's creation time and the nodes it asked."""
        found: list[tuple[float, set[int]]] = []
        chosen = [(d, c) for d, c, kind in self.messages.values() if kind == message_type]
        for dst, created in sorted(chosen, key=lambda item: item[1]):
            if found and created - found[-1][0] < gap:
                found[-1][1].add(dst)
            else:
                found.append((created, {dst}))
        return found
