"""The merchant side of ``fedshop client``: one SuperNode and the pinned ClientApp runner.

The SuperNode (``--isolation process``) talks to the platform and queues messages; the
runner (:mod:`simulations.deployment.runner`) answers them with the merchant's own installed
ClientApp, or refuses runs of any other app. Both children's output is relayed; this module
turns Flower's ways of failing into one clear line each:

* the platform's certificate is not signed by ``--ca-cert``: exit at once;
* ``--insecure-dev`` against a TLS platform (or TLS against a plaintext one): exit at once;
* activation refused (Flower code 2004): if this node was connected moments ago, the
  platform still lists it online after a crash and it retries for ``--rejoin-window``
  seconds; otherwise its key is not registered at the platform, and it exits saying so.

After a crash the platform keeps listing the node online until two heartbeats are missed
(60 s with Flower's defaults) and refuses to activate it again until then. To rejoin at once,
``fedshop client`` remembers its node id while connected (``FLWR_HOME/node-session.json``)
and, when it starts after a process of its own ended without signing off, signs that session
off first with the node's key (Flower's Fleet ``deactivate-node``, the call a SuperNode makes
on a clean exit).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_json
from common.errors import DeploymentError
from simulations.deployment.flower import SuperNodeSpec, supernode_argv
from simulations.deployment.process import (
    ManagedProcess,
    OutputRelay,
    flower_env,
    start_process,
    terminate_on_sigterm,
)

LOG = logging.getLogger("fedshop.deploy")

ACTIVATION_REFUSED = "[code: 2004]"
TLS_UNTRUSTED = "CERTIFICATE_VERIFY_FAILED"
PLAIN_TO_TLS = "400 Bad Request"  # nginx's answer to plain HTTP on its TLS port
SESSION_FILE = "node-session.json"  # rewritten while the SuperNode is connected (FLWR_HOME)
ALIVE_TOUCH_S = 5.0
STALE_AFTER_S = 3 * ALIVE_TOUCH_S  # a session not refreshed for this long has ended
_NODE_ID = re.compile(rb"SuperNode ID: (-?\d+)")
REJOIN_RETRY_S = 5.0
RUNNER_RESTARTS = 3
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ClientPlan:
    """One merchant's SuperNode and runner, validated before anything starts."""

    node: SuperNodeSpec
    app_dir: Path
    flwr_home: Path
    max_retries: int | None
    rejoin_window: float
    node_key_hint: str  # what to send the operator when the key is not registered

    @property
    def session_file(self) -> Path:
        return self.flwr_home / SESSION_FILE


@dataclass(frozen=True)
class NodeSession:
    """This merchant's SuperNode as last seen connected: its node id, our pid, when."""

    node_id: int
    pid: int
    alive_at: float

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.__dict__)

    @classmethod
    def read(cls, path: Path) -> NodeSession | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(data["node_id"]), int(data["pid"]), float(data["alive_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def held_by_live_process(self) -> bool:
        """Another ``fedshop client`` of this merchant is running right now."""
        if self.pid == os.getpid() or time.time() - self.alive_at > STALE_AFTER_S:
            return False
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"client" in cmdline


def sign_off_stale_session(plan: ClientPlan) -> None:
    """End the platform's record of a previous process of this node that died connected."""
    session = NodeSession.read(plan.session_file)
    if session is None or plan.node.node_key is None or plan.node.ca_cert is None:
        return
    if session.held_by_live_process():
        raise DeploymentError(
            f"another fedshop client for {plan.node.merchant_config} is running "
            f"(pid {session.pid}); stop it first"
        )
    if time.time() - session.alive_at > plan.rejoin_window:
        return  # the platform has long noticed it is gone
    try:
        _deactivate(plan, session.node_id)
    except Exception as exc:  # the platform may be down: the 2004 retry still applies
        LOG.info("could not sign off the previous session of node %d: %s", session.node_id, exc)
        return
    LOG.info(
        "signed off the previous session of node %d (its process ended without doing so)",
        session.node_id,
    )


def _deactivate(plan: ClientPlan, node_id: int) -> None:
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.retry import RetryInvoker, exponential
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    from common.certs import load_node_private_key

    assert plan.node.node_key is not None and plan.node.ca_cert is not None
    key = load_node_private_key(plan.node.node_key)
    client = FleetHttpClient.from_server_address(
        plan.node.superlink,
        insecure=False,
        root_certificates=str(plan.node.ca_cert),
        interceptors=[NodeAuthHttpInterceptor(key, key.public_key())],
        retry_invoker=RetryInvoker(exponential, (), max_tries=1, max_time=None),
    )
    try:
        client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    finally:
        client.close()


def probe_superlink(address: str, *, ca_cert: Path | None) -> str | None:
    """Why a SuperNode could never connect to ``address``, or None (unknown or fine).

    Only a platform that is up can be probed; one that is not yet up is not an error
    (merchants may start first and wait).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S)
    except (OSError, ValueError):
        return None
    context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    if ca_cert is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with raw, context.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as exc:
        return (
            f"the platform at {address} presents a certificate that --ca-cert {ca_cert} "
            f"does not vouch for (CERTIFICATE_VERIFY_FAILED: {exc.verify_message}); check "
            "that you were given the platform's ca.crt and its address"
        )
    except (ssl.SSLError, OSError) as exc:
        if ca_cert is None:
            return None  # a plaintext platform: what --insecure-dev expects
        return (
            f"the platform at {address} does not speak TLS ({exc}); it may be a plaintext "
            "development platform (--insecure-dev on both sides) or the wrong port"
        )
    if ca_cert is None:
        return (
            f"the platform at {address} speaks TLS: an --insecure-dev node cannot join it; "
            "pass --ca-cert ca.crt and --node-key NAME.node.key instead"
        )
    return None


class _Runner:
    """The ClientApp runner process, restarted if it dies (a few times at most)."""

    def __init__(self, plan: ClientPlan) -> None:
        self.plan = plan
        self.restarts = 0
        self.relay: OutputRelay | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "simulations.deployment.runner",
            "--runtime-api",
            self.plan.node.runtime_api,
            "--app",
            str(self.plan.app_dir),
            "--merchant-config",
            str(self.plan.node.merchant_config),
        ]

    def start(self) -> None:
        process = start_process(
            "ClientApp runner",
            self.argv(),
            env=flower_env(self.plan.flwr_home),
            log_path=None,
            relay=True,
        )
        self.relay = OutputRelay(process).start()

    def keep_alive(self) -> None:
        assert self.relay is not None
        if self.relay.process.alive():
            return
        code = self.relay.finish()
        if self.restarts >= RUNNER_RESTARTS:
            raise DeploymentError(
                f"the ClientApp runner exited with code {code} {self.restarts + 1} times "
                "(see its log above)"
            )
        self.restarts += 1
        LOG.warning("the ClientApp runner exited with code %s; restarting it", code)
        self.start()

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.finish()


def run_merchant(plan: ClientPlan) -> int:
    """Run the SuperNode and the runner until the SuperNode ends; return 0 or raise."""
    problem = probe_superlink(plan.node.superlink, ca_cert=plan.node.ca_cert)
    if problem is not None:
        raise DeploymentError(problem)
    sign_off_stale_session(plan)
    argv = supernode_argv(plan.node)
    if plan.max_retries is not None:
        argv += ["--max-retries", str(plan.max_retries)]
    runner = _Runner(plan)
    with terminate_on_sigterm():
        runner.start()
        try:
            while True:
                LOG.info(
                    "starting SuperNode for %s -> %s",
                    plan.node.merchant_config,
                    plan.node.superlink,
                )
                node = start_process(
                    "flower-supernode",
                    argv,
                    env=flower_env(plan.flwr_home),
                    log_path=None,
                    relay=True,
                )
                relay = NodeRelay(node, [ACTIVATION_REFUSED, TLS_UNTRUSTED, PLAIN_TO_TLS]).start()
                code = _supervise(node, relay, runner, plan)
                if code == 0:
                    return 0
                if not _should_rejoin(relay, plan):
                    raise _failure(relay, code, plan)
                LOG.warning(
                    "the platform still lists this node as online (its previous process "
                    "ended without signing off); retrying in %.0f s",
                    REJOIN_RETRY_S,
                )
                time.sleep(REJOIN_RETRY_S)
        finally:
            runner.stop()
            # Reached after the SuperNode ended (it signs off when stopped cleanly); only a
            # process that dies without getting here leaves a session to sign off.
            plan.session_file.unlink(missing_ok=True)


class NodeRelay(OutputRelay):
    """The SuperNode's output, also noting the node id it prints once activated."""

    node_id: int | None = None

    def on_line(self, line: bytes) -> None:
        match = _NODE_ID.search(line)
        if match is not None:
            self.node_id = int(match.group(1))


def _supervise(node: ManagedProcess, relay: NodeRelay, runner: _Runner, plan: ClientPlan) -> int:
    """Wait for the SuperNode to end, keeping the runner up and the session record fresh."""
    touched = 0.0
    try:
        while node.alive():
            if relay.seen(TLS_UNTRUSTED):
                break  # Flower gives up by itself too; no need to wait for it
            node_id = relay.node_id
            if node_id is not None and time.monotonic() - touched > ALIVE_TOUCH_S:
                NodeSession(node_id, os.getpid(), time.time()).write(plan.session_file)
                touched = time.monotonic()
            runner.keep_alive()
            time.sleep(0.2)
    finally:
        code = relay.finish()
    return 1 if code is None else code


def _should_rejoin(relay: NodeRelay, plan: ClientPlan) -> bool:
    """A refused activation right after this node was connected: the platform has not yet
    noticed that the old process is gone."""
    if not relay.seen(ACTIVATION_REFUSED):
        return False
    session = NodeSession.read(plan.session_file)
    return session is not None and time.time() - session.alive_at < plan.rejoin_window


def _failure(relay: NodeRelay, code: int, plan: ClientPlan) -> DeploymentError:
    if relay.seen(TLS_UNTRUSTED):
        return DeploymentError(
            f"the platform at {plan.node.superlink} presents a certificate that --ca-cert "
            f"{plan.node.ca_cert} does not vouch for (CERTIFICATE_VERIFY_FAILED); check that "
            "you were given the platform's ca.crt and its address"
        )
    if relay.seen(PLAIN_TO_TLS) and plan.node.ca_cert is None:
        return DeploymentError(
            f"the platform at {plan.node.superlink} speaks TLS: an --insecure-dev node cannot "
            "join it; pass --ca-cert ca.crt and --node-key NAME.node.key instead"
        )
    if relay.seen(ACTIVATION_REFUSED):
        return DeploymentError(
            f"the platform refused this node: its key is not registered there (or was "
            f"unregistered); send {plan.node_key_hint} to the platform's operator and start "
            "again once it is registered"
        )
    return DeploymentError(f"flower-supernode exited with code {code} (see its log above)")
