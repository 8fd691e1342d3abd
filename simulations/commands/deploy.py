"""``fedshop server`` and ``fedshop client``: a TLS federation of separate processes.

Both only check their command line and files here; the processes are run by
:mod:`simulations.deployment.platform` and :mod:`simulations.deployment.merchant`.
docs/deployment.md lists the raw Flower commands they wrap.
"""

from __future__ import annotations

import argparse
import logging
import os
import tomllib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from common import certs
from common.errors import ConfigError, DeploymentError
from simulations.cli import tcp_port
from simulations.deployment.flower import (
    WILDCARD_HOSTS,
    SuperLinkSpec,
    SuperNodeSpec,
    TlsFiles,
    preflight_tls,
)
from simulations.deployment.merchant import ClientPlan, run_merchant
from simulations.deployment.pinning import local_app_hash
from simulations.deployment.platform import RunRequest, ServerPlan, run_platform
from simulations.deployment.process import free_port

LOG = logging.getLogger("fedshop.deploy")
DEFAULT_PORT = 9092
DEFAULT_CONTROL_PORT = 9093
DEFAULT_REJOIN_WINDOW_S = 120.0
DEFAULT_IDLE_POLL_S = 1.0
FEDSHOP_SERVERAPP = "server.app:app"

SERVER_DESCRIPTION = """\
Run the platform: start a SuperLink bound to 127.0.0.1 (its Control API on --control-port,
for `flwr` on this host only) behind nginx on --host:--port, which passes merchants' Fleet API
traffic and refuses everything else; allow-list the merchants' node keys; then, with --config,
submit the fedshop app, print one line per round and exit with the run's outcome (0 only if
Flower reports it completed and the run wrote a completed summary.json). Without --config it
only serves until stopped.
"""

CLIENT_DESCRIPTION = """\
Run one merchant: a Flower SuperNode that connects out to the platform (TLS, node key) and a
long-running ClientApp runner that answers only runs of the app this merchant installed
(its app hash: --print-app-hash) or hashes listed in merchant.toml; any other run is refused
before any of its code is installed or run.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_server(subparsers)
    _register_client(subparsers)


def _register_server(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "server",
        help="run the platform's SuperLink and a training run",
        description=SERVER_DESCRIPTION,
    )
    p.add_argument("--certs", type=Path, help="directory with server.crt, server.key, ca.crt")
    p.add_argument("--state", type=Path, required=True, help="SuperLink state, logs, proxy")
    p.add_argument("--host", default="127.0.0.1", help="merchant-facing address (0.0.0.0: all)")
    p.add_argument(
        "--port",
        type=tcp_port("--port"),
        default=DEFAULT_PORT,
        help="merchant-facing port; 0 = free",
    )
    p.add_argument(
        "--control-port",
        type=tcp_port("--control-port"),
        default=DEFAULT_CONTROL_PORT,
        help="the SuperLink's own port on 127.0.0.1 (Control API for `flwr`); 0 = free",
    )
    p.add_argument("--nodes-allowlist", type=Path, help="directory of merchants' *.node.pub")
    p.add_argument("--config", type=Path, help="run TOML (docs/run.toml); without it, only serve")
    p.add_argument("--run-dir", type=Path, help="where the run writes its results (created)")
    p.add_argument(
        "--keys-dir", type=Path, help="directory of merchants' ledger public keys (MERCHANT.pub)"
    )
    p.add_argument(
        "--flwr-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Flower run-config value for the app (repeat), e.g. online-config=FILE",
    )
    p.add_argument("--app", type=Path, default=default_app_dir(), help="Flower app directory")
    p.add_argument("--wait-nodes", type=int, help="SuperNodes online before submitting")
    p.add_argument("--wait-timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--run-timeout", type=float, default=0.0, help="seconds, 0 = none")
    p.add_argument("--insecure-dev", action="store_true", help="plaintext, no node auth (dev)")
    p.add_argument(
        "--online",
        action="store_true",
        help="after the offline rounds keep fine-tuning on merchants' fresh inbox data, with "
        "the model registry and a Prometheus endpoint (run-config key online=true; settings "
        "from --flwr-config online-config=FILE, see docs/online.md)",
    )
    p.set_defaults(handler=run_server)


def _register_client(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "client", help="run one merchant's SuperNode", description=CLIENT_DESCRIPTION
    )
    p.add_argument("--config", type=Path, help="the merchant's merchant.toml")
    p.add_argument("--superlink", help="HOST:PORT of the platform (its merchant-facing port)")
    p.add_argument("--ca-cert", type=Path, help="the platform's CA certificate (ca.crt)")
    p.add_argument("--node-key", type=Path, help="this merchant's NAME.node.key")
    p.add_argument(
        "--app", type=Path, default=default_app_dir(), help="the app this merchant runs (pinned)"
    )
    p.add_argument(
        "--print-app-hash",
        action="store_true",
        help="print the app hash of --app (what this merchant answers) and exit",
    )
    p.add_argument("--flwr-home", type=Path, help="private Flower directory (default: by config)")
    p.add_argument(
        "--runtime-port",
        type=tcp_port("--runtime-port"),
        default=0,
        help="local Runtime API; 0 = free",
    )
    p.add_argument("--max-retries", type=int, help="give up after N failed connection attempts")
    p.add_argument(
        "--idle-poll",
        type=float,
        default=DEFAULT_IDLE_POLL_S,
        help="seconds between asks for work when idle for 4 s or more (Flower's own: 3); "
        "right after a reply it asks sooner (from 0.1 s, a quarter of the time idle); "
        "shorter picks up messages sooner at the price of more requests to the platform "
        "(default 1)",
    )
    p.add_argument(
        "--rejoin-window",
        type=float,
        default=DEFAULT_REJOIN_WINDOW_S,
        help="seconds after this node was last connected during which a refused activation "
        "means 'still listed online after a crash' and is retried (default 120)",
    )
    p.add_argument("--insecure-dev", action="store_true", help="plaintext, no node auth (dev)")
    p.set_defaults(handler=run_client)


def default_app_dir() -> Path:
    """The fedshop release this command belongs to (a source checkout)."""
    return Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- server


def parse_flwr_config(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings from ``--flwr-config``; keys with flags of their own are refused."""
    reserved = {"fedshop-config": "--config", "run-dir": "--run-dir", "keys-dir": "--keys-dir"}
    pairs: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise DeploymentError(
                f"--flwr-config {item!r}: expected KEY=VALUE, e.g. online-config=/srv/online.toml"
            )
        if key in reserved:
            raise DeploymentError(f"--flwr-config {key}: use {reserved[key]}")
        pairs.append((key, value.strip()))
    return tuple(pairs)


def app_pyproject(app_dir: Path) -> dict[str, object]:
    pyproject = app_dir / "pyproject.toml"
    try:
        with pyproject.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise DeploymentError(f"--app {app_dir} has no pyproject.toml (not a Flower app)") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeploymentError(f"{pyproject}: {exc}") from None


def _flwr_app(data: dict[str, object]) -> dict[str, object]:
    tool = data.get("tool")
    flwr = tool.get("flwr", {}) if isinstance(tool, dict) else {}
    app = flwr.get("app", {}) if isinstance(flwr, dict) else {}
    return app if isinstance(app, dict) else {}


def check_app_config_keys(app_dir: Path, keys: Sequence[str]) -> None:
    """Flower rejects run-config keys the app does not declare; say so before starting."""
    declared = _flwr_app(app_pyproject(app_dir)).get("config", {})
    missing = [key for key in keys if not isinstance(declared, dict) or key not in declared]
    if missing:
        raise DeploymentError(
            f"run-config keys {', '.join(missing)} are not declared in [tool.flwr.app.config]"
            f" of {app_dir / 'pyproject.toml'}; Flower would reject the run"
        )


def _is_fedshop_app(app_dir: Path) -> bool:
    components = _flwr_app(app_pyproject(app_dir)).get("components", {})
    return isinstance(components, dict) and components.get("serverapp") == FEDSHOP_SERVERAPP


def plan_run(args: argparse.Namespace) -> RunRequest | None:
    """The run to submit, with every file it names checked; nothing is created here."""
    if args.config is None:
        for flag, value in (
            ("--run-dir", args.run_dir),
            ("--keys-dir", args.keys_dir),
            ("--online", args.online or None),
            ("--flwr-config", args.flwr_config or None),
        ):
            if value is not None:
                raise DeploymentError(f"{flag} needs --config (the run to submit)")
        return None
    config = args.config.resolve()
    if config.is_dir():
        raise ConfigError(f"--config {config} is a directory; expected a TOML file")
    if not config.is_file():
        raise ConfigError(f"--config {config} does not exist")
    extra = parse_flwr_config([*args.flwr_config, *(["online=true"] if args.online else [])])
    app_dir = args.app.resolve()
    keys = ["fedshop-config", *(key for key, _ in extra)]
    keys += [k for k, v in (("run-dir", args.run_dir), ("keys-dir", args.keys_dir)) if v]
    check_app_config_keys(app_dir, keys)
    request = RunRequest(
        app_dir=app_dir,
        config=config,
        run_dir=args.run_dir.resolve() if args.run_dir else None,
        keys_dir=args.keys_dir.resolve() if args.keys_dir else None,
        flwr_config=extra,
    )
    if _is_fedshop_app(app_dir):
        return check_fedshop_run(request)
    return request


def check_fedshop_run(request: RunRequest) -> RunRequest:
    """What the fedshop ServerApp needs: a valid run TOML, a run directory, merchants' keys.
    A bad run TOML is a configuration error (its message names the file and key)."""
    from common.config import RunConfig
    from common.errors import FedshopError
    from common.keys import load_key_directory

    RunConfig.from_toml(request.config)
    if request.run_dir is None or request.keys_dir is None:
        raise DeploymentError(
            "--run-dir DIR and --keys-dir DIR are required with --config for the fedshop app"
        )
    try:
        keys = load_key_directory(request.keys_dir)
    except FedshopError as exc:
        raise DeploymentError(f"--keys-dir: {exc.one_line()}") from None
    if not keys:
        raise DeploymentError(
            f"--keys-dir {request.keys_dir} holds no MERCHANT.pub ledger keys; collect each "
            "merchant's MERCHANT.pub (from `fedshop merchant init`) there"
        )
    ledger = dict(request.flwr_config).get("server-ledger")
    ledger_dir = Path(ledger).parent if ledger else request.run_dir / "server"
    for directory in (request.run_dir, ledger_dir):
        _check_creatable(directory)
    return replace(request, ledger_dir=ledger_dir)


def _check_creatable(directory: Path) -> None:
    """``directory`` exists as a directory, or its nearest existing parent can hold it."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DeploymentError(f"cannot create {directory}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DeploymentError(f"cannot create {directory}: {probe} is not writable by this user")


def plan_server(args: argparse.Namespace) -> ServerPlan:
    """Check the whole command line and the files it names; start and create nothing."""
    if args.insecure_dev and args.nodes_allowlist is not None:
        raise DeploymentError(
            "--nodes-allowlist needs TLS: Flower authenticates nodes only over TLS"
        )
    if not args.insecure_dev and args.certs is None:
        raise DeploymentError("--certs DIR is required (or --insecure-dev for a plaintext dev run)")
    public_tls = None if args.insecure_dev else TlsFiles.from_dir(args.certs.resolve())
    if public_tls is not None:
        preflight_tls(public_tls, host=args.host)
    probe_host = "127.0.0.1" if args.host in WILDCARD_HOSTS else args.host
    port = args.port or free_port(probe_host)
    control_port = args.control_port or free_port()
    if port == control_port:
        raise DeploymentError(f"--port and --control-port are both {port}; they must differ")
    state = args.state.resolve()
    link = SuperLinkSpec(host="127.0.0.1", port=control_port, state_dir=state, tls=None)
    allowlist = certs.load_allowlist(args.nodes_allowlist) if args.nodes_allowlist else {}
    wait_nodes = len(allowlist) if args.wait_nodes is None else args.wait_nodes
    if wait_nodes < 0:
        raise DeploymentError(f"--wait-nodes {wait_nodes} must be >= 0")
    if not 0 < port < 65536:
        raise DeploymentError(f"--port {port} is not a TCP port (1-65535)")
    return ServerPlan(
        link=link,
        public_host=args.host,
        public_port=port,
        public_tls=public_tls,
        flwr_home=state / "flwr-home",
        allowlist=allowlist,
        run=plan_run(args),
        wait_nodes=wait_nodes,
        wait_timeout=float(args.wait_timeout),
        run_timeout=float(args.run_timeout),
        verbose=bool(getattr(args, "verbose", False)),
    )


def run_server(args: argparse.Namespace) -> int:
    plan = plan_server(args)
    if plan.public_tls is None:
        LOG.warning("--insecure-dev: plaintext SuperLink without node authentication (dev only)")
    return run_platform(plan)


# --------------------------------------------------------------------------- client


def plan_client(args: argparse.Namespace) -> ClientPlan:
    """Validate the merchant's command line and files; refuse plaintext unless asked."""
    from client.merchant import MerchantConfig

    if args.config is None or args.superlink is None:
        raise DeploymentError("--config merchant.toml and --superlink HOST:PORT are required")
    config = args.config.resolve()
    # The whole merchant.toml is read up front: a bad key is a configuration error (exit 3)
    # here, not a supernode that starts and fails on its first message.
    MerchantConfig.from_toml(config)
    if args.insecure_dev:
        if args.ca_cert is not None or args.node_key is not None:
            raise DeploymentError("--insecure-dev cannot be combined with --ca-cert/--node-key")
        ca_cert, node_key, hint = None, None, "nothing (no key in --insecure-dev mode)"
    else:
        if args.ca_cert is None or args.node_key is None:
            raise DeploymentError(
                "refusing to connect without TLS and node authentication: pass --ca-cert "
                "ca.crt and --node-key NAME.node.key (or --insecure-dev for a local dev run)"
            )
        certs.load_certificate(args.ca_cert)
        key = certs.load_node_private_key(args.node_key)
        ca_cert, node_key = args.ca_cert.resolve(), args.node_key.resolve()
        fingerprint = certs.public_key_fingerprint(key.public_key())
        public = node_key.with_name(node_key.name.removesuffix(".key") + ".pub")
        hint = f"{public.name} (fingerprint {fingerprint})"
    node = SuperNodeSpec(
        superlink=args.superlink,
        merchant_config=config,
        ca_cert=ca_cert,
        node_key=node_key,
        runtime_port=args.runtime_port or free_port(),
        idle_poll=float(args.idle_poll),
    )
    return ClientPlan(
        node=node,
        app_dir=args.app.resolve(),
        flwr_home=(args.flwr_home or config.parent / f".flwr-{config.stem}").resolve(),
        max_retries=args.max_retries,
        rejoin_window=max(float(args.rejoin_window), 0.0),
        node_key_hint=hint,
    )


def run_client(args: argparse.Namespace) -> int:
    if args.print_app_hash:
        print(local_app_hash(args.app.resolve()))
        return 0
    plan = plan_client(args)
    if plan.node.ca_cert is None:
        LOG.warning("--insecure-dev: plaintext connection without node authentication (dev only)")
    return run_merchant(plan)
