"""``fedshop server`` and ``fedshop client``: a TLS federation of separate processes.

``fedshop server`` starts a SuperLink (TLS, node authentication, SQLite state), allow-lists
merchants' node keys, submits the fedshop app and exits with the run's outcome.
``fedshop client`` starts one merchant's SuperNode and refuses to do so without TLS unless
``--insecure-dev`` is given. Both only wrap Flower's own commands; docs/deployment.md lists
the raw equivalents.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import certs
from common.atomic import atomic_write_json
from common.errors import DeploymentError
from simulations.deployment.flower import (
    FlwrCli,
    RunStatus,
    SuperLinkSpec,
    SuperNodeSpec,
    TlsFiles,
    preflight_tls,
    superlink_argv,
    supernode_argv,
    wait_nodes_online,
    write_connection_config,
)
from simulations.deployment.process import (
    ManagedProcess,
    flower_env,
    free_port,
    relay_until_exit,
    start_process,
    terminate_on_sigterm,
)

LOG = logging.getLogger("fedshop.deploy")
DEFAULT_PORT = 9092
READY_PATTERN = r"Uvicorn running on"
RUN_STATE_FILE = "last_run.json"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_server(subparsers)
    _register_client(subparsers)


def _register_server(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "server",
        help="run the platform's SuperLink and a training run",
        description="Start a TLS SuperLink with node authentication, allow-list the merchants' "
        "node keys, submit the fedshop app, follow its log and exit with the run's status.",
    )
    p.add_argument("--certs", type=Path, help="directory with server.crt, server.key, ca.crt")
    p.add_argument("--state", type=Path, required=True, help="SuperLink state and logs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--run-config", type=Path, help="run TOML; without it, only serve")
    p.add_argument("--nodes-allowlist", type=Path, help="directory of merchants' *.pub keys")
    p.add_argument("--app", type=Path, default=_default_app_dir(), help="Flower app directory")
    p.add_argument("--wait-nodes", type=int, help="SuperNodes online before submitting")
    p.add_argument("--wait-timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--run-timeout", type=float, default=0.0, help="seconds, 0 = none")
    p.add_argument(
        "--expect",
        type=Path,
        action="append",
        default=[],
        help="file the run must produce (repeat); in a JSON object, 'status' must be "
        "'completed' and 'completed' must be true where present",
    )
    p.add_argument(
        "--set",
        dest="run_config_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra run-config string (repeat), e.g. run-dir=/srv/fedshop/runs/2026-11",
    )
    p.add_argument("--insecure-dev", action="store_true", help="plaintext, no node auth (dev)")
    p.add_argument(
        "--online",
        action="store_true",
        help="after the offline rounds keep fine-tuning on merchants' fresh inbox data, with "
        "the model registry and a Prometheus endpoint (run-config key online=true; settings "
        "from --set online-config=FILE, see docs/online.md)",
    )
    p.set_defaults(handler=run_server)


# Flower's SuperLink refuses to activate a node it still lists as online (error code 2004);
# it lists a node online for 2 x its heartbeat interval (30 s by default) after the last beat.
ACTIVATION_REFUSED = "[code: 2004]"
ACTIVATION_REJOIN_WINDOW_S = 120.0
ACTIVATION_RETRY_S = 5.0


def _register_client(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "client",
        help="run one merchant's SuperNode",
        description="Run one merchant's SuperNode: it connects to the platform over TLS with "
        "its node key and trains on the merchant's own data under its own privacy budget.",
    )
    p.add_argument("--config", type=Path, required=True, help="the merchant TOML")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the platform's SuperLink")
    p.add_argument("--root-cert", type=Path, help="the platform's CA certificate (ca.crt)")
    p.add_argument("--node-key", type=Path, help="this merchant's NAME.node.key")
    p.add_argument("--flwr-home", type=Path, help="private Flower directory (default: by config)")
    p.add_argument("--runtime-port", type=int, default=0, help="local ClientApp API; 0 = free")
    p.add_argument("--max-retries", type=int, help="give up after N failed connection attempts")
    p.add_argument(
        "--rejoin-window",
        type=float,
        default=ACTIVATION_REJOIN_WINDOW_S,
        help="seconds to keep retrying while the SuperLink still lists this node as online "
        "(after a crash it does so for up to two heartbeat intervals)",
    )
    p.add_argument("--insecure-dev", action="store_true", help="plaintext, no node auth (dev)")
    p.set_defaults(handler=run_client)


def _default_app_dir() -> Path:
    return Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerPlan:
    """Everything ``fedshop server`` will do, validated before any process starts."""

    spec: SuperLinkSpec
    flwr_home: Path
    allowlist: dict[str, Path]
    run_config: Path | None
    app_dir: Path
    wait_nodes: int
    wait_timeout: float
    run_timeout: float
    expect: tuple[Path, ...]
    extra_run_config: tuple[tuple[str, str], ...] = ()


def parse_run_config_set(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings from ``--set``; ``fedshop-config`` comes from --run-config only."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise DeploymentError(f"--set {item!r}: expected KEY=VALUE, e.g. run-dir=/srv/run")
        if key == "fedshop-config":
            raise DeploymentError("--set fedshop-config: use --run-config for the run TOML")
        pairs.append((key, value.strip()))
    return tuple(pairs)


def check_app_config_keys(app_dir: Path, keys: Sequence[str]) -> None:
    """Flower rejects run-config keys the app does not declare; say so before starting."""
    pyproject = app_dir / "pyproject.toml"
    try:
        with pyproject.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise DeploymentError(f"--app {app_dir} has no pyproject.toml (not a Flower app)") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeploymentError(f"{pyproject}: {exc}") from None
    declared = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    missing = [key for key in keys if key not in declared]
    if missing:
        raise DeploymentError(
            f"run-config keys {', '.join(missing)} are not declared in [tool.flwr.app.config]"
            f" of {pyproject}; Flower would reject the run"
        )


def plan_server(args: argparse.Namespace) -> ServerPlan:
    """Check the whole command line and the files it names; start nothing."""
    if args.insecure_dev and args.nodes_allowlist is not None:
        raise DeploymentError(
            "--nodes-allowlist needs TLS: Flower authenticates nodes only over TLS"
        )
    if not args.insecure_dev and args.certs is None:
        raise DeploymentError("--certs DIR is required (or --insecure-dev for a plaintext dev run)")
    state = args.state.resolve()
    tls = None if args.insecure_dev else TlsFiles.from_dir(args.certs.resolve())
    port = args.port or free_port(args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1")
    spec = SuperLinkSpec(host=args.host, port=port, state_dir=state, tls=tls)
    preflight_tls(spec)
    allowlist = certs.load_allowlist(args.nodes_allowlist) if args.nodes_allowlist else {}
    run_config = args.run_config.resolve() if args.run_config else None
    if run_config is not None and not run_config.is_file():
        raise DeploymentError(f"--run-config {run_config} does not exist")
    extra = parse_run_config_set([*args.run_config_set, *(["online=true"] if args.online else [])])
    check_app_config_keys(args.app, ["fedshop-config", *(key for key, _ in extra)])
    wait_nodes = len(allowlist) if args.wait_nodes is None else args.wait_nodes
    if wait_nodes < 0:
        raise DeploymentError(f"--wait-nodes {wait_nodes} must be >= 0")
    return ServerPlan(
        spec=spec,
        flwr_home=state / "flwr-home",
        allowlist=allowlist,
        run_config=run_config,
        app_dir=args.app.resolve(),
        wait_nodes=wait_nodes,
        wait_timeout=float(args.wait_timeout),
        run_timeout=float(args.run_timeout),
        expect=tuple(p.resolve() for p in args.expect),
        extra_run_config=extra,
    )


def run_server(args: argparse.Namespace) -> int:
    plan = plan_server(args)
    if plan.spec.tls is None:
        LOG.warning("--insecure-dev: plaintext SuperLink without node authentication (dev only)")
    with terminate_on_sigterm():
        superlink = start_superlink(plan)
        try:
            cli = FlwrCli(plan.flwr_home)
            register_nodes(cli, plan)
            if plan.run_config is None:
                return serve_forever(superlink)
            return submit_and_follow(cli, plan, superlink)
        finally:
            LOG.info("stopping SuperLink (pid %d)", superlink.pid)
            superlink.stop()
            (plan.spec.state_dir / "superlink.pid").unlink(missing_ok=True)


def start_superlink(plan: ServerPlan) -> ManagedProcess:
    """Start the SuperLink and wait until its HTTPS API accepts connections."""
    state = plan.spec.state_dir
    state.mkdir(parents=True, exist_ok=True)
    root = plan.spec.tls.ca_cert if plan.spec.tls else None
    write_connection_config(plan.flwr_home, address=plan.spec.local_address, root_cert=root)
    log_path = state / "logs" / "superlink.log"
    LOG.info("starting SuperLink on %s (log %s)", plan.spec.local_address, log_path)
    process = start_process(
        "flower-superlink",
        superlink_argv(plan.spec),
        env=flower_env(plan.flwr_home),
        log_path=log_path,
        cwd=state,
    )
    (state / "superlink.pid").write_text(f"{process.pid}\n", encoding="utf-8")
    try:
        process.wait_for_log(READY_PATTERN, timeout=60.0)
    except BaseException:
        process.stop()
        raise
    return process


def register_nodes(cli: FlwrCli, plan: ServerPlan) -> None:
    """Allow-list every key; remember name -> node id in STATE/nodes.json for rotation."""
    if not plan.allowlist:
        return
    record_path = plan.spec.state_dir / "nodes.json"
    record: dict[str, Any] = (
        json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else {}
    )
    for name, path in plan.allowlist.items():
        outcome = cli.register_node(path, name=name)
        fingerprint = certs.public_key_fingerprint(certs.load_node_public_key(path))
        record[name] = {"public_key": str(path), "fingerprint": fingerprint}
        LOG.info("node %s (%s): %s", name, fingerprint[:23], outcome)
    atomic_write_json(record_path, record)


def serve_forever(superlink: ManagedProcess) -> int:
    LOG.info("serving; submit runs with `flwr run` (Ctrl-C or SIGTERM stops the SuperLink)")
    while superlink.alive():
        time.sleep(1.0)
    raise DeploymentError(
        f"SuperLink exited with code {superlink.popen.returncode}: {superlink.log_tail()}"
    )


def submit_and_follow(cli: FlwrCli, plan: ServerPlan, superlink: ManagedProcess) -> int:
    """Submit the app, stream its logs, and turn the run's final state into an exit code."""
    assert plan.run_config is not None
    if plan.wait_nodes:
        online = wait_nodes_online(cli, count=plan.wait_nodes, timeout=plan.wait_timeout)
        if online < plan.wait_nodes:
            raise DeploymentError(
                f"only {online} of {plan.wait_nodes} SuperNodes came online within "
                f"{plan.wait_timeout:.0f} s; check merchants' logs and allow-listed keys"
            )
    run_config = {"fedshop-config": str(plan.run_config), **dict(plan.extra_run_config)}
    run_id = cli.start_run(plan.app_dir, run_config)
    _write_run_state(plan, run_id, "running")
    LOG.info("submitted run %d; streaming its logs", run_id)
    status = follow_run(cli, run_id, superlink, timeout=plan.run_timeout)
    _write_run_state(plan, run_id, status)
    if status != RunStatus.COMPLETED.value:
        raise DeploymentError(f"run {run_id} ended as {status}; see `flwr log {run_id}`")
    check_expected(plan.expect)
    LOG.info("run %d completed", run_id)
    return 0


def follow_run(cli: FlwrCli, run_id: int, superlink: ManagedProcess, *, timeout: float) -> str:
    """Stream logs to stdout until the run finishes; return its ``finished:*`` status."""
    stream = start_process(
        "flwr log", cli.log_stream_argv(run_id), env=cli.env, log_path=None, cwd=None
    )
    deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
    try:
        while True:
            if not superlink.alive():
                raise DeploymentError(
                    f"SuperLink died during run {run_id} (code {superlink.popen.returncode});"
                    " restart `fedshop server` with the same --state to resume"
                )
            if not stream.alive():
                status = str(cli.run_info(run_id).get("status", ""))
                if status.startswith("finished"):
                    return status
                stream = start_process(
                    "flwr log", cli.log_stream_argv(run_id), env=cli.env, log_path=None
                )
            if time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s")
            time.sleep(1.0)
    finally:
        stream.stop(grace=2.0)


def check_expected(paths: Sequence[Path]) -> None:
    """``flwr`` reports success even when every client failed: check the run's own results."""
    for path in paths:
        if not path.is_file():
            raise DeploymentError(f"the run completed but did not write {path}")
        if path.suffix != ".json":
            continue
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DeploymentError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            continue
        if payload.get("status", "completed") != "completed":
            raise DeploymentError(f"{path} reports status {payload.get('status')!r}")
        if payload.get("completed", True) is not True:
            raise DeploymentError(f"{path} reports completed = {payload.get('completed')!r}")


def _write_run_state(plan: ServerPlan, run_id: int, status: str) -> None:
    path = plan.spec.state_dir / RUN_STATE_FILE
    payload = {"run_id": run_id, "status": status, "run_config": str(plan.run_config)}
    atomic_write_json(path, payload, indent=None, sort_keys=False)


# --------------------------------------------------------------------------- client


def plan_client(args: argparse.Namespace) -> SuperNodeSpec:
    """Validate the merchant's command line and files; refuse plaintext unless asked."""
    config = args.config.resolve()
    _check_merchant_config(config)
    if args.insecure_dev:
        if args.root_cert is not None or args.node_key is not None:
            raise DeploymentError("--insecure-dev cannot be combined with --root-cert/--node-key")
        root_cert, node_key = None, None
    else:
        if args.root_cert is None or args.node_key is None:
            raise DeploymentError(
                "refusing to connect without TLS and node authentication: pass --root-cert "
                "ca.crt and --node-key NAME.node.key (or --insecure-dev for a local dev run)"
            )
        certs.load_certificate(args.root_cert)
        certs.load_node_private_key(args.node_key)
        root_cert, node_key = args.root_cert.resolve(), args.node_key.resolve()
    return SuperNodeSpec(
        superlink=args.superlink,
        merchant_config=config,
        root_cert=root_cert,
        node_key=node_key,
        runtime_port=args.runtime_port or free_port(),
    )


def _check_merchant_config(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise DeploymentError(f"merchant config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeploymentError(f"merchant config {path}: {exc}") from None
    if not isinstance(data.get("merchant"), dict):
        raise DeploymentError(f"merchant config {path} has no [merchant] table")


def run_client(args: argparse.Namespace) -> int:
    spec = plan_client(args)
    flwr_home = (
        args.flwr_home or spec.merchant_config.parent / f".flwr-{args.config.stem}"
    ).resolve()
    argv = supernode_argv(spec)
    if args.max_retries is not None:
        argv += ["--max-retries", str(args.max_retries)]
    if spec.root_cert is None:
        LOG.warning("--insecure-dev: plaintext connection without node authentication (dev only)")
    deadline = time.monotonic() + max(args.rejoin_window, 0.0)
    with terminate_on_sigterm():
        while True:
            LOG.info("starting SuperNode for %s -> %s", spec.merchant_config, spec.superlink)
            node = start_process(
                "flower-supernode", argv, env=flower_env(flwr_home), log_path=None, relay=True
            )
            code, refused = relay_until_exit(node, ACTIVATION_REFUSED)
            if code == 0 or not refused or time.monotonic() >= deadline:
                break
            # A node that died without signing off stays "online" at the SuperLink until its
            # heartbeat lapses; activation is refused until then.
            LOG.warning(
                "the SuperLink still lists this node as online (a previous process ended "
                "without signing off); retrying in %.0f s",
                ACTIVATION_RETRY_S,
            )
            time.sleep(ACTIVATION_RETRY_S)
    if code != 0:
        raise DeploymentError(f"flower-supernode exited with code {code} (see its log above)")
    return 0
