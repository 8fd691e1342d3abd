"""`fedshop server` / `fedshop client`: the exact Flower commands, refusals and preflight checks.

The fast tests check commands and validation without starting anything. The slow ones start a
real TLS SuperLink and SuperNodes as separate processes on loopback with a toy app (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import certs
from common.errors import ConfigError, DeploymentError, ExitCode
from simulations.commands import deploy
from simulations.deployment.flower import (
    SuperLinkSpec,
    SuperNodeSpec,
    TlsFiles,
    preflight_tls,
    superlink_argv,
    supernode_argv,
    toml_string,
    write_connection_config,
)
from simulations.deployment.process import (
    flower_env,
    free_port,
    relay_until_exit,
    start_process,
)

sys.path.insert(0, str(Path(__file__).parent / "support"))
import deploy_harness as h


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    deploy.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


@pytest.fixture
def pki(tmp_path: Path) -> h.Pki:
    return h.make_pki(tmp_path / "pki", ["m1", "m2", "m3", "rogue"])


# ----------------------------------------------------------------- fast: commands and refusals


def test_superlink_command_has_tls_auth_and_persistent_state(pki: h.Pki, tmp_path: Path) -> None:
    spec = SuperLinkSpec("127.0.0.1", 9092, tmp_path / "st", TlsFiles.from_dir(pki.server))
    argv = superlink_argv(spec)
    assert argv[0].endswith("flower-superlink")
    assert "--insecure" not in argv and "--enable-supernode-auth" in argv
    for flag, value in [
        ("--ssl-ca-certfile", pki.server / "ca.crt"),
        ("--ssl-certfile", pki.server / "server.crt"),
        ("--ssl-keyfile", pki.server / "server.key"),
        ("--database", tmp_path / "st" / "state.db"),
        ("--port", "9092"),
    ]:
        assert argv[argv.index(flag) + 1] == str(value)
    assert "--disable-runtime-dependency-installation" in argv
    dev = superlink_argv(SuperLinkSpec("127.0.0.1", 9092, tmp_path, None))
    assert "--insecure" in dev and "--enable-supernode-auth" not in dev


def test_supernode_command_passes_root_cert_key_and_merchant_config(tmp_path: Path) -> None:
    spec = SuperNodeSpec(
        superlink="link:9092",
        merchant_config=tmp_path / "m.toml",
        ca_cert=tmp_path / "ca.crt",
        node_key=tmp_path / "m.node.key",
        runtime_port=9100,
    )
    argv = supernode_argv(spec)
    assert argv[argv.index("--node-config") + 1] == f'merchant-config="{tmp_path / "m.toml"}"'
    # The SuperNode runs no ClientApp itself; its Runtime API stays on loopback.
    assert argv[argv.index("--isolation") + 1] == "process"
    assert argv[1:3] == ["-m", "simulations.deployment.supernode"]
    assert argv[argv.index("--idle-poll") + 1] == "1"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(tmp_path / "m.node.key")
    assert "--insecure" not in argv
    with pytest.raises(DeploymentError, match="absolute"):
        SuperNodeSpec("l:1", Path("rel.toml"), None, None, 1)
    with pytest.raises(DeploymentError, match="needs TLS"):
        SuperNodeSpec("l:1", tmp_path / "m.toml", None, tmp_path / "k", 1)


def test_client_refuses_to_start_without_tls(tmp_path: Path, pki: h.Pki) -> None:
    config = h.make_merchant(tmp_path, "m1")
    args = parse("client", "--config", str(config), "--superlink", "127.0.0.1:9092")
    with pytest.raises(DeploymentError, match="refusing to connect without TLS"):
        deploy.plan_client(args)
    only_cert = parse(
        "client",
        "--config",
        str(config),
        "--superlink",
        "x:1",
        "--ca-cert",
        str(pki.ca / "ca.crt"),
    )
    with pytest.raises(DeploymentError, match="--node-key"):
        deploy.plan_client(only_cert)
    mixed = parse(
        "client",
        "--config",
        str(config),
        "--superlink",
        "x:1",
        "--insecure-dev",
        "--ca-cert",
        str(pki.ca / "ca.crt"),
    )
    with pytest.raises(DeploymentError, match="cannot be combined"):
        deploy.plan_client(mixed)
    dev = deploy.plan_client(
        parse("client", "--config", str(config), "--superlink", "x:1", "--insecure-dev")
    )
    assert dev.node.ca_cert is None and "--insecure" in supernode_argv(dev.node)


def test_client_checks_files_before_starting(tmp_path: Path, pki: h.Pki) -> None:
    config = h.make_merchant(tmp_path, "m1")
    base = ["client", "--superlink", "x:1", "--ca-cert", str(pki.ca / "ca.crt")]
    key = str(pki.nodes / "m1.node.key")
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        deploy.plan_client(parse(*base, "--config", str(tmp_path / "nope.toml"), "--node-key", key))
    (tmp_path / "bad.toml").write_text("[other]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: expected exactly one \[merchant\] table"):
        deploy.plan_client(parse(*base, "--config", str(tmp_path / "bad.toml"), "--node-key", key))
    loose = tmp_path / "loose.toml"
    loose.write_text(config.read_text().replace("[merchant]", "[merchant]\nepsilon_cap = 1e300"))
    with pytest.raises(ConfigError, match=r"loose\.toml: merchant\.epsilon_cap must be in"):
        deploy.plan_client(parse(*base, "--config", str(loose), "--node-key", key))
    with pytest.raises(DeploymentError, match="not an OpenSSH private key"):
        deploy.plan_client(
            parse(*base, "--config", str(config), "--node-key", str(pki.server / "server.key"))
        )
    with pytest.raises(DeploymentError, match=r"is a public key.*m1\.node\.key"):
        deploy.plan_client(
            parse(*base, "--config", str(config), "--node-key", str(pki.nodes / "m1.node.pub"))
        )
    plan = deploy.plan_client(parse(*base, "--config", str(config), "--node-key", key))
    assert plan.node.node_key == (pki.nodes / "m1.node.key").resolve()
    assert plan.node.runtime_port > 0
    assert "m1.node.pub" in plan.node_key_hint and "SHA256:" in plan.node_key_hint


def test_client_cli_maps_refusal_to_deployment_exit_code(tmp_path: Path) -> None:
    config = h.make_merchant(tmp_path, "m1")
    done = subprocess.run(
        [sys.executable, str(h.CLI), "client", "--config", str(config), "--superlink", "x:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == ExitCode.DEPLOYMENT
    assert "refusing to connect without TLS" in done.stderr


def test_server_preflight_catches_certificate_for_another_host(pki: h.Pki, tmp_path: Path) -> None:
    other = tmp_path / "other-server"
    certs.issue_server_cert(ca_dir=pki.ca, hosts=["link.example.com"], out=other)
    with pytest.raises(DeploymentError, match=r"for host '127\.0\.0\.1'"):
        preflight_tls(TlsFiles.from_dir(other), host="127.0.0.1")
    # On all addresses the names cannot be checked, the chain and the key still are.
    preflight_tls(TlsFiles.from_dir(other), host="0.0.0.0")
    foreign = tmp_path / "foreign"
    certs.issue_server_cert(ca_dir=pki.other_ca, hosts=["link.example.com"], out=foreign)
    (foreign / "ca.crt").write_bytes((pki.ca / "ca.crt").read_bytes())
    with pytest.raises(DeploymentError, match="does not verify"):
        preflight_tls(TlsFiles.from_dir(foreign), host="0.0.0.0")
    wildcard = SuperLinkSpec("0.0.0.0", 9092, tmp_path, TlsFiles.from_dir(pki.server))
    assert wildcard.local_address == "127.0.0.1:9092"


def test_server_plan_validates_everything_first(pki: h.Pki, tmp_path: Path) -> None:
    app = h.make_toy_app(tmp_path)
    state = str(tmp_path / "state")
    tls = ["server", "--certs", str(pki.server), "--state", state, "--app", str(app)]
    with pytest.raises(DeploymentError, match="--certs DIR is required"):
        deploy.plan_server(parse("server", "--state", state, "--app", str(app)))
    with pytest.raises(DeploymentError, match="needs TLS"):
        deploy.plan_server(
            parse("server", "--state", state, "--insecure-dev", "--nodes-allowlist", "x")
        )
    with pytest.raises(ConfigError, match="does not exist"):
        deploy.plan_server(parse(*tls, "--config", str(tmp_path / "missing.toml")))
    with pytest.raises(ConfigError, match="is a directory; expected a TOML file"):
        deploy.plan_server(parse(*tls, "--config", str(tmp_path)))
    spec = h.write_run_spec(tmp_path / "run.json", run_dir=str(tmp_path), min_nodes=1)
    with pytest.raises(DeploymentError, match="online-config are not declared"):
        deploy.plan_server(parse(*tls, "--config", str(spec), "--flwr-config", "online-config=x"))
    with pytest.raises(DeploymentError, match="expected KEY=VALUE"):
        deploy.plan_server(parse(*tls, "--config", str(spec), "--flwr-config", "nokey"))
    with pytest.raises(DeploymentError, match="use --run-dir"):
        deploy.plan_server(parse(*tls, "--config", str(spec), "--flwr-config", "run-dir=/x"))
    with pytest.raises(DeploymentError, match="--run-dir needs --config"):
        deploy.plan_server(parse(*tls, "--run-dir", str(tmp_path / "run")))
    plan = deploy.plan_server(
        parse(*tls, "--port", "0", "--control-port", "0", "--nodes-allowlist", str(pki.nodes))
    )
    assert sorted(plan.allowlist) == ["m1", "m2", "m3", "rogue"]
    assert plan.wait_nodes == 4 and plan.public_port > 0 and plan.link.port > 0
    assert plan.link.host == "127.0.0.1"  # the Control API never listens on the public address
    assert not (tmp_path / "state").exists()  # nothing written before everything is valid


def test_server_plan_checks_what_the_fedshop_run_needs(pki: h.Pki, tmp_path: Path) -> None:
    """The fedshop app's run: a valid run TOML, merchants' ledger keys, a run directory that
    can be created; each problem is named before anything starts."""
    from common.keys import generate_keypair

    run_toml = tmp_path / "run.toml"
    run_toml.write_text("[federation]\nrounds = 2\n")
    keys_dir = tmp_path / "keys"
    base = ["server", "--certs", str(pki.server), "--state", str(tmp_path / "state")]
    run = [*base, "--config", str(run_toml), "--run-dir", str(tmp_path / "run" / "r1")]
    with pytest.raises(DeploymentError, match="--run-dir DIR and --keys-dir DIR are required"):
        deploy.plan_server(parse(*base, "--config", str(run_toml)))
    with pytest.raises(DeploymentError, match=r"key directory .* does not exist"):
        deploy.plan_server(parse(*run, "--keys-dir", str(keys_dir)))
    keys_dir.mkdir()
    with pytest.raises(DeploymentError, match=r"holds no MERCHANT\.pub"):
        deploy.plan_server(parse(*run, "--keys-dir", str(keys_dir)))
    generate_keypair(tmp_path / "m1-home", name="m1")
    (keys_dir / "m1.pub").write_bytes((tmp_path / "m1-home" / "m1.pub").read_bytes())
    (tmp_path / "blocker").write_text("a file, not a directory")
    with pytest.raises(DeploymentError, match="blocker is not a directory"):
        deploy.plan_server(
            parse(
                *base,
                "--config",
                str(run_toml),
                "--keys-dir",
                str(keys_dir),
                "--run-dir",
                str(tmp_path / "blocker" / "run"),
            )
        )
    run_toml.write_text("[federation]\nrounds = 'two'\n")
    with pytest.raises(ConfigError, match=r"federation\.rounds"):
        deploy.plan_server(parse(*run, "--keys-dir", str(keys_dir)))
    run_toml.write_text("[federation]\nrounds = 2\n")
    plan = deploy.plan_server(parse(*run, "--keys-dir", str(keys_dir)))
    assert plan.run is not None and plan.run.ledger_dir == tmp_path / "run" / "r1" / "server"
    assert plan.run.run_config() == {
        "fedshop-config": str(run_toml),
        "run-dir": str(tmp_path / "run" / "r1"),
        "keys-dir": str(keys_dir),
    }
    assert not (tmp_path / "run").exists() and not (tmp_path / "state").exists()
    # Once started, `fedshop server` creates them (the ledger directory included).
    from simulations.deployment.platform import make_directory

    for directory in (plan.run.run_dir, plan.run.ledger_dir):
        assert directory is not None
        make_directory(directory)
    assert (tmp_path / "run" / "r1" / "server").is_dir()


def test_connection_config_is_read_by_flower(
    pki: h.Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "home"
    write_connection_config(home, address="127.0.0.1:1234", root_cert=pki.server / "ca.crt")
    monkeypatch.setenv("FLWR_HOME", str(home))
    connection = read_superlink_connection(None)
    assert connection.address == "127.0.0.1:1234"
    assert connection.root_certificates == str((pki.server / "ca.crt").resolve())
    assert connection.insecure is False
    write_connection_config(home, address="127.0.0.1:1234", root_cert=None)
    assert read_superlink_connection("fedshop").insecure is True


@pytest.mark.parametrize("value", ['a"b', "a\\b", "a\nb", "it's"])
def test_config_values_that_would_break_flower_parsing_are_refused(value: str) -> None:
    with pytest.raises(DeploymentError, match="must not contain"):
        toml_string(value, what="path")


def test_run_summary_must_exist_and_report_completed(tmp_path: Path) -> None:
    from simulations.deployment.platform import check_summary

    summary = tmp_path / "summary.json"
    with pytest.raises(DeploymentError, match="did not write"):
        check_summary(summary)
    summary.write_text(json.dumps({"status": "failed"}))
    with pytest.raises(DeploymentError, match="'failed'"):
        check_summary(summary)
    summary.write_text(json.dumps({"completed": False}))
    with pytest.raises(DeploymentError, match="completed = False"):
        check_summary(summary)
    summary.write_text(json.dumps({"completed": True, "rounds": 2}))
    check_summary(summary)


# ----------------------------------------------------------------- slow: real processes


def _client(
    root: Path, pki: h.Pki, name: str, port: int, *extra: str, key: str | None = None
) -> subprocess.Popen[bytes]:
    """``fedshop client`` for a toy merchant: it pins the toy app (its installed app)."""
    config = h.make_merchant(root, name)
    args = ["client", "--config", str(config), "--superlink", f"127.0.0.1:{port}", *extra]
    args += ["--app", str(_toy_app(root))]
    if "--insecure-dev" not in extra and "--ca-cert" not in extra:
        args += ["--ca-cert", str(pki.server / "ca.crt")]
    if "--insecure-dev" not in extra:
        args += ["--node-key", str(pki.nodes / f"{key or name}.node.key")]
    return h.start_fedshop(args, root / f"{name}.log", cwd=root)


def _toy_app(root: Path) -> Path:
    return h.make_toy_app(root) if not (root / "toyapp-src").exists() else root / "toyapp-src"


def _server(root: Path, pki: h.Pki, port: int, run_spec: Path, *extra: str) -> list[str]:
    return [
        "server",
        "--certs",
        str(pki.server),
        "--state",
        str(root / "state"),
        "--port",
        str(port),
        "--control-port",
        str(free_port()),
        "--app",
        str(_toy_app(root)),
        "--config",
        str(run_spec),
        *extra,
    ]


def test_stop_reaches_helpers_that_started_their_own_session(tmp_path: Path) -> None:
    """Flower's SuperLink detaches its SuperExec (a new session): stopping the SuperLink must
    not leave it, or the ServerApp it started, running."""
    pid_file = tmp_path / "helper.pid"
    script = f"setsid sleep 300 & echo $! > {pid_file}; sleep 300"
    leader = start_process(
        "fake-superlink", ["bash", "-c", script], env=flower_env(tmp_path / "h"), log_path=None
    )
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    helper = int(pid_file.read_text())
    # `setsid` may not have detached yet when its pid is written: wait until it has
    deadline = time.monotonic() + 10
    while os.getsid(helper) == os.getsid(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.getsid(helper) != os.getsid(leader.pid)  # out of reach of the group signal
    leader.stop(grace=2.0)
    deadline = time.monotonic() + 10
    while _running(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(helper)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed process may wait a moment to be reaped by init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_relay_returns_when_the_leader_exits_even_if_a_helper_holds_the_pipe(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A SuperNode refused activation exits while its SuperExec helper lives on: the client
    must see the exit and the refusal at once, not wait for the helper to close the pipe."""
    script = "sleep 300 & echo 'note'; echo '[code: 2004] Failed to activate SuperNode.'; exit 1"
    began = time.monotonic()
    node = start_process(
        "fake-supernode",
        ["bash", "-c", script],
        env=flower_env(tmp_path / "home"),
        log_path=None,
        relay=True,
    )
    code, refused = relay_until_exit(node, "[code: 2004]")
    assert (code, refused) == (1, True)
    assert time.monotonic() - began < 30
    assert node.popen.poll() is not None
    assert "Failed to activate SuperNode" in capfd.readouterr().out
    quiet = start_process(
        "fine",
        ["bash", "-c", "echo ok"],
        env=flower_env(tmp_path / "h2"),
        log_path=None,
        relay=True,
    )
    assert relay_until_exit(quiet, "[code: 2004]") == (0, False)


@pytest.mark.slow
def test_tls_federation_refuses_bad_nodes_and_completes_with_good_ones(
    tmp_path: Path, pki: h.Pki
) -> None:
    """Bad nodes exit on their own within 30 s, each with a line saying why; the good ones
    train while a merchant's attempts on the control surface, through the port merchants
    use, are refused."""
    port, control = free_port(), free_port()
    allow = tmp_path / "allow"
    allow.mkdir()
    for name in ("m1", "m2"):
        (allow / f"{name}.node.pub").write_bytes((pki.nodes / f"{name}.node.pub").read_bytes())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = h.write_run_spec(
        tmp_path / "run.json", run_dir=str(run_dir), min_nodes=2, rounds=3, round_pause=4.0
    )
    server_args = _server(tmp_path, pki, port, spec, "--nodes-allowlist", str(allow))
    server_args[server_args.index("--control-port") + 1] = str(control)
    server = h.start_fedshop(
        [*server_args, "--run-timeout", "400"], tmp_path / "server.log", cwd=tmp_path
    )
    procs = [server]
    try:
        h.wait_for(
            lambda: (tmp_path / "state" / "nodes.json").exists(),
            timeout=90,
            what="link",
            proc=server,
        )
        procs += [_client(tmp_path, pki, name, port) for name in ("m1", "m2")]
        started = time.monotonic()
        bad = {
            "rogue": _client(tmp_path, pki, "rogue", port),
            "wrongca": _client(
                tmp_path, pki, "wrongca", port, "--ca-cert", str(pki.other_ca / "ca.crt"), key="m3"
            ),
            "plain": _client(tmp_path, pki, "plain", port, "--insecure-dev"),
        }
        procs += list(bad.values())
        for proc in bad.values():
            proc.wait(timeout=120)
        bad_seconds = time.monotonic() - started
        h.wait_for((run_dir / "checkpoint.json").exists, timeout=200, what="round 1", proc=server)
        attempts = h.merchant_control_attempts(
            tmp_path / "merchant-flwr",
            port,
            pki.server / "ca.crt",
            pki.nodes / "m1.node.key",
            app=_toy_app(tmp_path),
        )
        operator = h.operator_flwr_ls(tmp_path / "state" / "flwr-home")
        assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for proc in procs:
            h.stop(proc)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in bad}
    assert all(proc.returncode == ExitCode.DEPLOYMENT for proc in bad.values()), logs
    assert bad_seconds < 30, logs
    assert "its key is not registered there" in logs["rogue"]
    assert "SHA256:" in logs["rogue"] and "rogue.node.pub" in logs["rogue"]
    assert "does not vouch for" in logs["wrongca"]
    assert "speaks TLS: an --insecure-dev node cannot join it" in logs["plain"]
    # The merchant-facing port: every control and runtime call refused, by nginx itself.
    assert attempts and all(outcome == "refused" for outcome in attempts.values()), attempts
    assert operator  # the platform host still reaches its Control API (the run is listed)
    access = (tmp_path / "state" / "logs" / "proxy-access.log").read_text()
    assert '"POST /v1/control/list-runs HTTP/1.1" 403' in access
    assert '"POST /v1/fleet/pull-messages HTTP/1.1" 200' in access
    assert json.loads((run_dir / "result.json").read_text()) == {"status": "completed", "nodes": 2}
    for name in ("m1", "m2"):  # they kept training while the attempts were made
        rounds = (tmp_path / "merchants" / name / "rounds.log").read_text().split()
        assert rounds == ["1", "2", "3"]
    for name in ("rogue", "wrongca", "plain"):
        assert not (tmp_path / "merchants" / name / "rounds.log").exists()
    last = json.loads((tmp_path / "state" / "last_run.json").read_text())
    assert last["status"] == "finished:completed"
    nodes = json.loads((tmp_path / "state" / "nodes.json").read_text())
    assert sorted(nodes) == ["m1", "m2"]


@pytest.mark.slow
def test_failed_run_gives_deployment_exit_code_in_plaintext_dev_mode(tmp_path: Path) -> None:
    port = free_port()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = h.write_run_spec(tmp_path / "run.json", run_dir=str(run_dir), min_nodes=1, fail=True)
    args = [
        "server",
        "--insecure-dev",
        "--state",
        str(tmp_path / "state"),
        "--port",
        str(port),
        "--control-port",
        str(free_port()),
        "--app",
        str(h.make_toy_app(tmp_path)),
        "--config",
        str(spec),
        "--wait-nodes",
        "1",
    ]
    server = h.start_fedshop(args, tmp_path / "server.log", cwd=tmp_path)
    client = None
    try:
        h.wait_for(
            lambda: (tmp_path / "state" / "superlink.pid").exists(),
            timeout=90,
            what="link",
            proc=server,
        )
        client = _client(tmp_path, h.Pki(*(tmp_path,) * 4), "m1", port, "--insecure-dev")
        code = server.wait(timeout=300)
    finally:
        h.stop(server)
        if client is not None:
            h.stop(client)
    log = (tmp_path / "server.log").read_text()
    assert code == ExitCode.DEPLOYMENT, log[-3000:]
    assert "ended as finished:failed" in log
    assert "toy ServerApp asked to fail" in log  # the run's errors reach the operator
    assert json.loads((tmp_path / "state" / "last_run.json").read_text())["status"] == (
        "finished:failed"
    )


@pytest.mark.slow
def test_server_killed_mid_run_restarts_and_resumes_with_same_state(
    tmp_path: Path, pki: h.Pki
) -> None:
    port = free_port()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = h.write_run_spec(
        tmp_path / "run.json", run_dir=str(run_dir), min_nodes=2, rounds=4, round_pause=2.0
    )
    allow = ["--nodes-allowlist", str(tmp_path / "allow"), "--run-timeout", "400"]
    (tmp_path / "allow").mkdir()
    for name in ("m1", "m2"):
        (tmp_path / "allow" / f"{name}.node.pub").write_bytes(
            (pki.nodes / f"{name}.node.pub").read_bytes()
        )
    checkpoint = run_dir / "checkpoint.json"
    server = h.start_fedshop(
        _server(tmp_path, pki, port, spec, *allow), tmp_path / "s1.log", cwd=tmp_path
    )
    clients: list[subprocess.Popen[bytes]] = []
    restarted = None
    try:
        h.wait_for(
            lambda: (tmp_path / "state" / "nodes.json").exists(),
            timeout=90,
            what="link",
            proc=server,
        )
        clients = [_client(tmp_path, pki, name, port) for name in ("m1", "m2")]
        h.wait_for(checkpoint.exists, timeout=200, what="round 1", proc=server)
        superlink_pid = int((tmp_path / "state" / "superlink.pid").read_text())
        h.kill_tree(server)  # a crash of the platform machine: nothing gets to clean up
        crashed_at = json.loads(checkpoint.read_text())["round"]
        assert crashed_at < 4
        h.wait_for(
            lambda: (
                not Path(f"/proc/{superlink_pid}").exists()
                or "Z" in Path(f"/proc/{superlink_pid}/stat").read_text().split()[2]
            ),
            timeout=30,
            what="SuperLink to die",
        )
        assert all(c.poll() is None for c in clients)  # merchants keep retrying
        restarted = h.start_fedshop(
            _server(tmp_path, pki, port, spec, *allow), tmp_path / "s2.log", cwd=tmp_path
        )
        assert restarted.wait(timeout=400) == 0, (tmp_path / "s2.log").read_text()[-3000:]
    finally:
        for proc in [server, *clients, *([restarted] if restarted else [])]:
            h.stop(proc)
    assert json.loads(checkpoint.read_text()) == {"round": 4}
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert "already registered" in (tmp_path / "s2.log").read_text()
    for name in ("m1", "m2"):
        rounds = [
            int(r) for r in (tmp_path / "merchants" / name / "rounds.log").read_text().split()
        ]
        assert sorted(set(rounds)) == [1, 2, 3, 4]
        after_restart = rounds[rounds.index(crashed_at + 1) :] if crashed_at + 1 in rounds else []
        assert after_restart[-(4 - crashed_at) :] == list(range(crashed_at + 1, 5))
