"""The platform side of ``fedshop server``: a loopback SuperLink, nginx in front, one run.

Order of a start: every file is checked (:func:`simulations.commands.deploy.plan_server`),
then the run directory is created, the SuperLink starts on 127.0.0.1 (Control API on the
control port), nginx starts on the merchant-facing address (Fleet API only), allow-listed
node keys are registered, and the run is submitted and followed to its end. Everything that
was started is stopped on the way out, whatever the way out is.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import certs
from common.atomic import atomic_write_json
from common.errors import DeploymentError
from simulations.deployment.flower import (
    FlwrCli,
    RunStatus,
    SuperLinkSpec,
    TlsFiles,
    superlink_argv,
    wait_nodes_online,
    write_connection_config,
)
from simulations.deployment.process import (
    ManagedProcess,
    flower_env,
    port_accepts,
    start_process,
)
from simulations.deployment.proxy import FleetProxySpec, LoopbackTls, nginx_argv, write_config
from simulations.deployment.run_log import RunLogView

LOG = logging.getLogger("fedshop.deploy")
READY_PATTERN = r"Uvicorn running on"
RUN_STATE_FILE = "last_run.json"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class RunRequest:
    """The run ``fedshop server`` submits: the app, its run TOML and the run-config keys."""

    app_dir: Path
    config: Path
    run_dir: Path | None = None
    keys_dir: Path | None = None
    ledger_dir: Path | None = None  # where the platform's ledger file goes (created)
    flwr_config: tuple[tuple[str, str], ...] = ()

    def run_config(self) -> dict[str, str]:
        values = {"fedshop-config": str(self.config)}
        if self.run_dir is not None:
            values["run-dir"] = str(self.run_dir)
        if self.keys_dir is not None:
            values["keys-dir"] = str(self.keys_dir)
        return {**values, **dict(self.flwr_config)}


@dataclass(frozen=True)
class ServerPlan:
    """Everything ``fedshop server`` will do, validated before any process starts."""

    link: SuperLinkSpec  # 127.0.0.1, the Control API's port; tls set by prepare()
    public_host: str
    public_port: int
    public_tls: TlsFiles | None  # None: --insecure-dev
    flwr_home: Path
    allowlist: dict[str, Path]
    run: RunRequest | None
    wait_nodes: int
    wait_timeout: float
    run_timeout: float
    verbose: bool = False

    @property
    def state_dir(self) -> Path:
        return self.link.state_dir

    @property
    def public_address(self) -> str:
        return f"{self.public_host}:{self.public_port}"


def prepare(plan: ServerPlan) -> ServerPlan:
    """Create what the run needs (state, run and ledger directories, loopback TLS)."""
    for directory in _directories(plan):
        make_directory(directory)
    if plan.public_tls is None:
        return plan
    loopback = LoopbackTls(plan.state_dir / "loopback-tls").ensure()
    link = SuperLinkSpec(
        plan.link.host,
        plan.link.port,
        plan.state_dir,
        TlsFiles(loopback.ca_cert, loopback.cert, loopback.key),
    )
    return replace(plan, link=link)


def _directories(plan: ServerPlan) -> list[Path]:
    found = [plan.state_dir, plan.state_dir / "logs"]
    if plan.run is not None:
        found += [p for p in (plan.run.run_dir, plan.run.ledger_dir) if p is not None]
    return found


def make_directory(path: Path) -> None:
    """``mkdir -p`` that names the directory and the reason when it cannot."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeploymentError(f"cannot create directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DeploymentError(f"directory {path} is not writable by this user")


def start_superlink(plan: ServerPlan) -> ManagedProcess:
    """Start the SuperLink on 127.0.0.1 and wait until its API accepts connections."""
    root = plan.link.tls.ca_cert if plan.link.tls else None
    write_connection_config(plan.flwr_home, address=plan.link.local_address, root_cert=root)
    log_path = plan.state_dir / "logs" / "superlink.log"
    LOG.info("starting SuperLink on %s (log %s)", plan.link.local_address, log_path)
    process = start_process(
        "flower-superlink",
        superlink_argv(plan.link),
        env=flower_env(plan.flwr_home),
        log_path=log_path,
        cwd=plan.state_dir,
    )
    (plan.state_dir / "superlink.pid").write_text(f"{process.pid}\n", encoding="utf-8")
    try:
        process.wait_for_log(READY_PATTERN, timeout=60.0)
    except BaseException:
        process.stop()
        raise
    return process


def proxy_spec(plan: ServerPlan) -> FleetProxySpec:
    tls = plan.public_tls
    return FleetProxySpec(
        listen_host=plan.public_host,
        listen_port=plan.public_port,
        upstream_port=plan.link.port,
        upstream_ca=plan.link.tls.ca_cert if plan.link.tls else None,
        certificate=tls.cert if tls else None,
        private_key=tls.key if tls else None,
        directory=plan.state_dir / "proxy",
        log_dir=plan.state_dir / "logs",
    )


def start_proxy(plan: ServerPlan) -> ManagedProcess:
    """Start nginx on the merchant-facing address and wait until it accepts connections."""
    spec = proxy_spec(plan)
    write_config(spec)
    LOG.info(
        "merchants connect to %s (Fleet API only; Control API on %s for this host)",
        plan.public_address,
        plan.link.local_address,
    )
    process = start_process(
        "nginx",
        nginx_argv(spec),
        env=dict(os.environ),
        log_path=plan.state_dir / "logs" / "proxy.log",
    )
    probe = "127.0.0.1" if plan.public_host in ("0.0.0.0", "::", "") else plan.public_host
    deadline = time.monotonic() + 30.0
    while not port_accepts(probe, plan.public_port):
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            detail = spec.error_log.read_text() if spec.error_log.exists() else ""
            raise DeploymentError(
                f"nginx did not start on {plan.public_address}: "
                f"{detail.strip().splitlines()[-1] if detail.strip() else 'no error logged'}"
            )
        time.sleep(0.1)
    return process


def register_nodes(cli: FlwrCli, plan: ServerPlan) -> None:
    """Allow-list every key; remember name -> fingerprint in STATE/nodes.json for rotation."""
    if not plan.allowlist:
        return
    record_path = plan.state_dir / "nodes.json"
    record: dict[str, Any] = (
        json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else {}
    )
    for name, path in plan.allowlist.items():
        outcome = cli.register_node(path, name=name)
        fingerprint = certs.public_key_fingerprint(certs.load_node_public_key(path))
        record[name] = {"public_key": str(path), "fingerprint": fingerprint}
        LOG.info("node %s (%s): %s", name, fingerprint[:23], outcome)
    atomic_write_json(record_path, record)


def serve_forever(processes: Sequence[ManagedProcess]) -> int:
    LOG.info("serving; submit runs with `flwr run` (Ctrl-C or SIGTERM stops everything)")
    while all(p.alive() for p in processes):
        time.sleep(1.0)
    dead = next(p for p in processes if not p.alive())
    raise DeploymentError(
        f"{dead.name} exited with code {dead.popen.returncode}: {dead.log_tail()}"
    )


def submit_and_follow(cli: FlwrCli, plan: ServerPlan, processes: Sequence[ManagedProcess]) -> int:
    """Submit the app, show its rounds, and turn the run's final state into an exit code."""
    run = plan.run
    assert run is not None
    if plan.wait_nodes:
        online = wait_nodes_online(cli, count=plan.wait_nodes, timeout=plan.wait_timeout)
        if online < plan.wait_nodes:
            raise DeploymentError(
                f"only {online} of {plan.wait_nodes} SuperNodes came online within "
                f"{plan.wait_timeout:.0f} s; check merchants' logs and allow-listed keys"
            )
    run_id = cli.start_run(run.app_dir, run.run_config())
    _write_run_state(plan, run_id, "running")
    log_file = plan.state_dir / "logs" / f"run-{run_id}.log"
    LOG.info("submitted run %d (its full log: %s)", run_id, log_file)
    view = RunLogView(log_file, verbose=plan.verbose)
    try:
        status = follow_run(cli, run_id, processes, view, timeout=plan.run_timeout)
    finally:
        view.close()
    _write_run_state(plan, run_id, status)
    if status != RunStatus.COMPLETED.value:
        raise DeploymentError(f"run {run_id} ended as {status}; its log: {log_file}")
    if run.run_dir is not None:
        check_summary(run.run_dir / SUMMARY_FILE)
    LOG.info("run %d completed", run_id)
    return 0


def follow_run(
    cli: FlwrCli,
    run_id: int,
    processes: Sequence[ManagedProcess],
    view: RunLogView,
    *,
    timeout: float,
) -> str:
    """Feed the run's log to ``view`` until the run finishes; return its ``finished:*`` status."""
    deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
    stream, reader = _stream_log(cli, run_id, view)
    try:
        while True:
            for process in processes:
                if not process.alive():
                    raise DeploymentError(
                        f"{process.name} died during run {run_id} (code "
                        f"{process.popen.returncode}); restart `fedshop server` with the same "
                        "--state to resume"
                    )
            if not stream.alive():
                reader.join(timeout=5.0)
                status = str(cli.run_info(run_id).get("status", ""))
                if status.startswith("finished"):
                    return status
                stream, reader = _stream_log(cli, run_id, view)
            if time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s")
            time.sleep(1.0)
    finally:
        stream.stop(grace=2.0)
        reader.join(timeout=5.0)


def _stream_log(
    cli: FlwrCli, run_id: int, view: RunLogView
) -> tuple[ManagedProcess, threading.Thread]:
    stream = start_process(
        "flwr log", cli.log_stream_argv(run_id), env=cli.env, log_path=None, relay=True
    )
    pipe = stream.popen.stdout
    assert pipe is not None

    def copy() -> None:
        for raw in iter(pipe.readline, b""):
            view.feed(raw.decode("utf-8", errors="replace"))

    reader = threading.Thread(target=copy, name=f"run-log-{run_id}", daemon=True)
    reader.start()
    return stream, reader


def check_summary(path: Path) -> None:
    """``flwr`` reports success even when every merchant failed: read the run's own summary."""
    if not path.is_file():
        raise DeploymentError(f"the run completed but did not write {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeploymentError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise DeploymentError(f"{path} does not hold a JSON object")
    if payload.get("status", "completed") != "completed":
        raise DeploymentError(f"{path} reports status {payload.get('status')!r}")
    if payload.get("completed", True) is not True:
        raise DeploymentError(f"{path} reports completed = {payload.get('completed')!r}")


def _write_run_state(plan: ServerPlan, run_id: int, status: str) -> None:
    assert plan.run is not None
    payload = {"run_id": run_id, "status": status, "run_config": str(plan.run.config)}
    atomic_write_json(plan.state_dir / RUN_STATE_FILE, payload, indent=None, sort_keys=False)


def run_platform(plan: ServerPlan) -> int:
    """Start, serve or run, and stop everything that was started."""
    plan = prepare(plan)
    started: list[ManagedProcess] = []
    try:
        started.append(start_superlink(plan))
        started.append(start_proxy(plan))
        cli = FlwrCli(plan.flwr_home)
        register_nodes(cli, plan)
        if plan.run is None:
            return serve_forever(started)
        return submit_and_follow(cli, plan, started)
    finally:
        for process in reversed(started):
            LOG.info("stopping %s (pid %d)", process.name, process.pid)
            process.stop()
        (plan.state_dir / "superlink.pid").unlink(missing_ok=True)
