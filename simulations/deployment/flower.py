"""The exact Flower commands of a fedshop deployment, and a thin driver of the ``flwr`` CLI.

Everything here shells out to Flower's own executables (``flower-superlink``,
``flower-supernode``, ``flwr``) so that an operator can reproduce each step by hand
(docs/deployment.md lists the raw commands). The ``flwr`` CLI reports failures inside its JSON
output while exiting 0, so every call here reads ``"success"`` rather than the exit code.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from common.certs import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    load_certificate,
    subject_alt_names,
    verify_key_matches_cert,
    verify_server_cert,
)
from common.errors import DeploymentError
from simulations.deployment.process import flower_bin, flower_env

CONNECTION = "fedshop"
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_CLI_TIMEOUT_S = 120.0


class RunStatus(Enum):
    """Final states of a Flower run as ``flwr ls`` reports them."""

    COMPLETED = "finished:completed"
    FAILED = "finished:failed"
    STOPPED = "finished:stopped"


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS material (server-side TLS; SuperNodes authenticate with keys)."""

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, certs_dir: Path) -> TlsFiles:
        return cls(certs_dir / CA_CERT, certs_dir / SERVER_CERT, certs_dir / SERVER_KEY)


@dataclass(frozen=True)
class SuperLinkSpec:
    """How to start one SuperLink. ``tls=None`` is the plaintext development mode.

    ``fedshop server`` binds it to 127.0.0.1 (its Control API, ``port``) with a loopback
    certificate; merchants reach its Fleet API only through the proxy (:mod:`.proxy`).
    """

    host: str
    port: int
    state_dir: Path
    tls: TlsFiles | None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise DeploymentError(f"--port {self.port} is not a TCP port (1-65535)")

    @property
    def local_address(self) -> str:
        """Where processes on this machine reach the SuperLink (the Control API for ``flwr``)."""
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        return f"{_bracket(host)}:{self.port}"


def _bracket(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def preflight_tls(tls: TlsFiles, *, host: str) -> None:
    """Fail early and clearly if the certificate would make every SuperNode's handshake fail.

    ``host`` is the merchant-facing address; a wildcard (``0.0.0.0``) cannot be checked
    against the certificate's names, only the chain and the key are.
    """
    for path in (tls.ca_cert, tls.cert, tls.key):
        if not path.is_file():
            raise DeploymentError(f"TLS file {path} is missing (see `fedshop certs --help`)")
    verify_key_matches_cert(key_path=tls.key, cert_path=tls.cert)
    if host in WILDCARD_HOSTS:
        names = subject_alt_names(load_certificate(tls.cert))
        if not names:
            raise DeploymentError(f"{tls.cert} names no host (no subjectAltName)")
        host = names[0]
    verify_server_cert(cert_path=tls.cert, ca_cert_path=tls.ca_cert, host=host)


def superlink_argv(spec: SuperLinkSpec) -> list[str]:
    """``flower-superlink`` with TLS, node authentication and a persistent SQLite state."""
    argv = [
        flower_bin("flower-superlink"),
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--database",
        str(spec.state_dir / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if spec.tls is None:
        return [*argv, "--insecure"]
    return [
        *argv,
        "--ssl-ca-certfile",
        str(spec.tls.ca_cert),
        "--ssl-certfile",
        str(spec.tls.cert),
        "--ssl-keyfile",
        str(spec.tls.key),
        "--enable-supernode-auth",
    ]


@dataclass(frozen=True)
class SuperNodeSpec:
    """How to start one merchant's SuperNode. ``ca_cert=None`` is plaintext development mode.

    The SuperNode runs with ``--isolation process``: it queues each message on its Runtime
    API (``runtime_port`` on 127.0.0.1) and starts no ClientApp itself; the merchant's own
    runner (:mod:`.runner`) claims the messages.
    """

    superlink: str
    merchant_config: Path
    ca_cert: Path | None
    node_key: Path | None
    runtime_port: int
    idle_poll: float = 1.0  # seconds between asks for work when idle (Flower: 3)

    def __post_init__(self) -> None:
        if not 0.1 <= self.idle_poll <= 3.0:
            raise DeploymentError(f"--idle-poll {self.idle_poll} must be between 0.1 and 3 s")
        if not self.merchant_config.is_absolute():
            raise DeploymentError(
                f"merchant config {self.merchant_config} must be an absolute path"
            )
        if self.ca_cert is None and self.node_key is not None:
            raise DeploymentError("a node key needs TLS: Flower authenticates nodes only over TLS")

    @property
    def runtime_api(self) -> str:
        return f"127.0.0.1:{self.runtime_port}"


def toml_string(value: str, *, what: str) -> str:
    """``value`` as a TOML basic string for ``--node-config``/``--run-config`` (no escapes)."""
    if any(ch in value for ch in "\"\\'\n") or not value.isprintable():
        raise DeploymentError(f"{what} {value!r} must not contain quotes, backslashes or newlines")
    return f'"{value}"'


def supernode_argv(spec: SuperNodeSpec) -> list[str]:
    """``flower-supernode`` for one merchant: TLS root, node key, merchant config, no ClientApp.

    It runs through :mod:`simulations.deployment.supernode`, which only shortens Flower's idle
    wait between asks for work to ``idle_poll`` seconds."""
    node_config = f"merchant-config={toml_string(str(spec.merchant_config), what='config path')}"
    argv = [
        sys.executable,
        "-m",
        "simulations.deployment.supernode",
        "--idle-poll",
        f"{spec.idle_poll:g}",
        "--superlink",
        spec.superlink,
        "--node-config",
        node_config,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(spec.runtime_port),
    ]
    if spec.ca_cert is None:
        return [*argv, "--insecure"]
    argv += ["--root-certificates", str(spec.ca_cert)]
    if spec.node_key is not None:
        argv += ["--auth-supernode-private-key", str(spec.node_key)]
    return argv


def write_connection_config(
    flwr_home: Path, *, address: str, root_cert: Path | None, name: str = CONNECTION
) -> Path:
    """A private ``$FLWR_HOME/config.toml`` whose default connection is this SuperLink."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{address}"')
    if root_cert is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_string(str(root_cert.resolve()), what='CA path')}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class FlwrCli:
    """Runs ``flwr`` against the private connection in ``flwr_home``."""

    flwr_home: Path
    connection: str = CONNECTION

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def _json(self, args: Sequence[str], *, what: str) -> dict[str, Any]:
        argv = [flower_bin("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(
                argv, env=self.env, capture_output=True, text=True, timeout=_CLI_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"{what}: `flwr {args[0]}` did not answer") from None
        try:
            payload: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            detail = (done.stderr or done.stdout).strip()[-800:]
            raise DeploymentError(f"{what}: unexpected output from flwr: {detail}") from None
        return payload

    def register_node(self, public_key: Path, *, name: str) -> str:
        """Allow-list one SuperNode key; an already registered key is fine (restarts)."""
        payload = self._json(
            ["supernode", "register", str(public_key), self.connection, "--name", name],
            what=f"registering {public_key}",
        )
        if payload.get("success"):
            return "registered"
        message = str(payload.get("error-message", payload))
        if "already in use" in message:
            return "already registered"
        raise DeploymentError(f"registering {public_key} failed: {message.strip()}")

    def list_nodes(self) -> list[dict[str, Any]]:
        payload = self._json(["supernode", "ls", self.connection], what="listing SuperNodes")
        if not payload.get("success"):
            raise DeploymentError(f"listing SuperNodes failed: {payload.get('error-message')}")
        return list(payload.get("nodes", []))

    def start_run(self, app_dir: Path, run_config: Mapping[str, str]) -> int:
        """Submit the app in ``app_dir`` with string run-config values; return the run id."""
        args = ["run", str(app_dir), self.connection]
        for key, value in run_config.items():
            args += ["--run-config", f"{key}={toml_string(value, what=f'run config {key}')}"]
        payload = self._json(args, what="submitting the run")
        if not payload.get("success") or payload.get("run-id") is None:
            raise DeploymentError(f"flwr run failed: {payload.get('error-message', payload)}")
        return int(payload["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        payload = self._json(
            ["ls", self.connection, "--run-id", str(run_id)], what=f"reading run {run_id}"
        )
        runs = payload.get("runs") or []
        if not payload.get("success") or not runs:
            raise DeploymentError(f"run {run_id} is unknown: {payload.get('error-message')}")
        return dict(runs[0])

    def log_stream_argv(self, run_id: int) -> list[str]:
        return [flower_bin("flwr"), "log", str(run_id), self.connection, "--stream"]


def wait_nodes_online(cli: FlwrCli, *, count: int, timeout: float) -> int:
    """Poll until ``count`` SuperNodes are online; return how many are."""
    deadline = time.monotonic() + timeout
    online = 0
    while True:
        online = sum(1 for node in cli.list_nodes() if node.get("status") == "online")
        if online >= count or time.monotonic() >= deadline:
            return online
        time.sleep(2.0)
