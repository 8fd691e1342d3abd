"""The parts of a deployment that need no running federation: app hashes and pinning, the
proxy's configuration, the run log view, the client's probes and sessions, merchant init."""

from __future__ import annotations

import io
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from client.merchant import MerchantConfig
from common.errors import ConfigError, DataValidationError, DeploymentError
from simulations.deployment.pinning import (
    PinnedApps,
    build_bundle,
    bundle_app_hash,
    extra_app_hashes,
    local_app_hash,
)

sys.path.insert(0, str(Path(__file__).parent / "support"))
import deploy_harness as h

REPO = Path(__file__).resolve().parents[1]


def _rezip(bundle: bytes, *, compression: int, change: dict[str, bytes] | None = None) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(bundle))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as target:
        for info in source.infolist():
            data = (change or {}).get(info.filename, source.read(info))
            target.writestr(info.filename, data)
        for name, data in (change or {}).items():
            if name not in source.namelist():
                target.writestr(name, data)
    return out.getvalue()


# ------------------------------------------------------------------------- app hashes


def test_app_hash_covers_the_contents_not_the_compression(tmp_path: Path) -> None:
    bundle = build_bundle(h.make_toy_app(tmp_path))
    reference = bundle_app_hash(bundle)
    assert bundle_app_hash(_rezip(bundle, compression=zipfile.ZIP_STORED)) == reference
    assert bundle_app_hash(_rezip(bundle, compression=zipfile.ZIP_BZIP2)) == reference
    source = zipfile.ZipFile(io.BytesIO(bundle)).read("toyapp.py")
    changed = _rezip(bundle, compression=zipfile.ZIP_DEFLATED, change={"toyapp.py": source + b"#"})
    assert bundle_app_hash(changed) != reference
    added = _rezip(bundle, compression=zipfile.ZIP_DEFLATED, change={"extra.py": b"x = 1\n"})
    assert bundle_app_hash(added) != reference


def test_unreadable_bundles_are_refused_not_unpacked() -> None:
    with pytest.raises(DeploymentError, match="not a zip"):
        bundle_app_hash(b"not a zip at all")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("a.py", b"1")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("a.py", b"2")
    with pytest.raises(DeploymentError, match="twice"):
        bundle_app_hash(out.getvalue())


def test_the_fedshop_bundle_holds_only_the_apps_code() -> None:
    """Docs, tests and benchmarks are outside the bundle, so editing them does not change the
    app hash merchants pin; the code the ServerApp and ClientApp import is inside."""
    names = zipfile.ZipFile(io.BytesIO(build_bundle(REPO))).namelist()
    assert "client/app.py" in names and "server/app.py" in names and "common/config.py" in names
    outside = [n for n in names if not n.startswith(("common/", "client/", "server/"))]
    assert sorted(outside) == [".info/CONTENT", "pyproject.toml"]
    assert all(n.endswith(".py") for n in names if n not in outside)


def test_print_app_hash_is_the_installed_release_hash() -> None:
    done = subprocess.run(
        [sys.executable, str(h.CLI), "client", "--print-app-hash"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == local_app_hash(REPO)


def test_pinned_hashes_come_from_the_install_and_merchant_toml(tmp_path: Path) -> None:
    config = tmp_path / "merchant.toml"
    config.write_text('[merchant]\nid = "m1"\n')
    assert extra_app_hashes(config) == ()
    config.write_text(f'[merchant]\nid = "m1"\napp_hashes = ["{"b" * 64}"]\n')
    pinned = PinnedApps("a" * 64, extra_app_hashes(config))
    assert pinned.allows("a" * 64) and pinned.allows("b" * 64) and not pinned.allows("c" * 64)
    config.write_text('[merchant]\nid = "m1"\napp_hashes = ["ABC"]\n')
    with pytest.raises(DeploymentError, match=r"merchant\.app_hashes entry 'ABC'"):
        extra_app_hashes(config)
    with pytest.raises(ConfigError, match="app_hashes entry"):
        MerchantConfig(id="m1", data=tmp_path, state_dir=tmp_path, signing_key=tmp_path,
                       app_hashes=("xyz",))  # fmt: skip


def test_the_impersonating_test_app_would_leak_if_it_ran(tmp_path: Path) -> None:
    """The app the refusal test submits really does put a merchant's events in its reply
    when its ClientApp runs: the refusal is what stops it."""
    evil = h.make_evil_app(tmp_path)
    events = tmp_path / "events.parquet"
    events.write_bytes(b"secret events of m1")
    config = tmp_path / "merchant.toml"
    config.write_text(f'[merchant]\nid = "m1"\ndata = "{events}"\n')
    script = f"""
import sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from simulations.deployment.runner import load_client_app
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
app = load_client_app(__import__("pathlib").Path({str(evil)!r}))
msg = Message(RecordDict({{"config": ConfigRecord({{"round": 1}})}}), dst_node_id=1,
              message_type="train")
msg.metadata.__dict__["_message_id"] = "m" * 64
ctx = Context(run_id=1, node_id=1, node_config={{"merchant-config": {str(config)!r}}},
              state=RecordDict(), run_config={{}})
reply = app(message=msg, context=ctx)
sys.stdout.write(bytes(reply.content["leak"]["events"]).decode())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.stdout == "secret events of m1", done.stderr[-2000:]
    assert bundle_app_hash(build_bundle(evil)) != local_app_hash(REPO)


def test_the_supernode_fixed_waits_are_shortened_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supernode import start_client_internal

    from simulations.deployment import supernode

    monkeypatch.setattr(start_client_internal, "time", time)
    pushed: list[dict[str, object]] = []
    monkeypatch.setattr(start_client_internal, "_push_messages", lambda **kw: pushed.append(kw))
    now = [100.0]
    # Flower 1.41 as installed
    assert supernode.shorten_idle_wait(start_client_internal, 0.8, clock=lambda: now[0])
    patched = start_client_internal.time
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    patched.sleep(3)  # no reply yet: the idle poll
    patched.sleep(0.5)  # the check for a finished reply
    patched.sleep(1.5)  # any other wait: unchanged
    assert slept == [0.8, 0.05, 1.5] and patched.monotonic is time.monotonic
    start_client_internal._push_messages(state="s")  # a reply went back at t = 100
    assert pushed == [{"state": "s"}]
    slept.clear()
    for now[0] in (100.0, 100.2, 101.0, 102.0, 104.0, 110.0):
        patched.sleep(3)
    # right after a reply: quick, then a quarter of the idle time, at most the idle poll
    assert slept == pytest.approx([0.1, 0.1, 0.25, 0.5, 0.8, 0.8])
    assert not supernode.shorten_idle_wait(start_client_internal, 0.2)  # only once
    # the SuperNode asks again for parts of a message in transit after 50 ms, not 1 s
    from common.flower_waits import REMOTE_RETRIES, quicken_object_pulls

    monkeypatch.setattr(start_client_internal, "pull_objects", start_client_internal.pull_objects)
    assert quicken_object_pulls(start_client_internal, REMOTE_RETRIES)
    assert not quicken_object_pulls(start_client_internal, REMOTE_RETRIES)  # only once
    assert supernode.split_args(["--idle-poll", "0.5", "--insecure"]) == (0.5, ["--insecure"])
    assert supernode.split_args(["--insecure"]) == (1.0, ["--insecure"])
    with pytest.raises(SystemExit, match=r"between 0\.1 and 3"):
        supernode.split_args(["--idle-poll", "5"])


def test_an_idle_merchant_asks_once_per_idle_poll_and_about_ten_more_times_per_reply() -> None:
    """What the adaptive wait costs the platform, as docs/transport.md states it."""
    from simulations.deployment.supernode import idle_wait

    def asks(seconds: float, idle_s: float | None) -> int:
        count, t = 0, 0.0
        while t < seconds:
            t += idle_wait(None if idle_s is None else idle_s + t, 1.0)
            count += 1
        return count

    assert asks(60.0, None) == 60  # never replied: one ask per second
    assert asks(60.0, 3600.0) == 60  # long idle: the same
    assert 10 <= asks(4.0, 0.0) - 4 <= 12  # the 4 s after a reply: about ten more


# ------------------------------------------------------------------------- the proxy


def _proxy_spec(tmp_path: Path, pki: h.Pki) -> object:
    from simulations.deployment.proxy import FleetProxySpec, LoopbackTls

    loopback = LoopbackTls(tmp_path / "loopback").ensure()
    return FleetProxySpec(
        listen_host="127.0.0.1",
        listen_port=9092,
        upstream_port=9093,
        upstream_ca=loopback.ca_cert,
        certificate=pki.server / "server.crt",
        private_key=pki.server / "server.key",
        directory=tmp_path / "proxy",
        log_dir=tmp_path / "logs",
    )


def test_the_proxy_forwards_the_fleet_api_and_nothing_else(tmp_path: Path) -> None:
    from simulations.deployment.proxy import FLEET_PREFIX, nginx_conf

    pki = h.make_pki(tmp_path / "pki", [])
    conf = nginx_conf(_proxy_spec(tmp_path, pki))  # type: ignore[arg-type]
    locations = [line.strip() for line in conf.splitlines() if line.strip().startswith("location")]
    assert locations == [f"location {FLEET_PREFIX} {{", "location / {"]
    assert conf.count("proxy_pass") == 1 and "return 403" in conf
    assert "listen 127.0.0.1:9092 ssl;" in conf and "server 127.0.0.1:9093" in conf
    assert "proxy_ssl_verify on;" in conf


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    from simulations.deployment.proxy import write_config

    try:
        from simulations.deployment.proxy import find_nginx

        find_nginx()
    except DeploymentError:
        pytest.skip("nginx is not installed (`make test-deps` installs it)")
    pki = h.make_pki(tmp_path / "pki", [])
    assert write_config(_proxy_spec(tmp_path, pki)).is_file()  # type: ignore[arg-type]


def test_the_loopback_certificate_is_made_once_and_names_loopback_only(tmp_path: Path) -> None:
    from common.certs import load_certificate, subject_alt_names
    from simulations.deployment.proxy import LoopbackTls

    first = LoopbackTls(tmp_path / "lt").ensure()
    issued = first.cert.read_bytes()
    assert LoopbackTls(tmp_path / "lt").ensure().cert.read_bytes() == issued
    assert sorted(subject_alt_names(load_certificate(first.cert))) == ["127.0.0.1", "localhost"]
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600


# ------------------------------------------------------------------------- the run log


def test_the_run_log_view_shows_rounds_and_problems(tmp_path: Path) -> None:
    from simulations.deployment.run_log import RunLogView

    out = io.StringIO()
    view = RunLogView(tmp_path / "run.log", out=out, progress=False)
    lines = [
        "Using SuperLink: fedshop (127.0.0.1:9093)",
        "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process",
        "INFO    : server.federation: round 1/3: 3 trained, 0 refused, 0 failed | loss 0.6 | "
        "ndcg@10 0.21 | eps max 1.100 | 9.0s",
        "WARNING : server.federation: round 2: merchant m2 dropped: restarted mid-round",
        "INFO    : server.federation: round 2/3: 2 trained, 0 refused, 1 failed | eps max 1.5",
        "INFO    : server.federation: round 1/3: 3 trained, 0 refused, 0 failed | replayed",
        "Traceback (most recent call last):",
        "RuntimeError: the ServerApp failed",
    ]
    for line in lines:
        view.feed(line + "\n")
    view.close()
    shown = out.getvalue().splitlines()
    assert shown == [
        "round 1/3 | 3 trained, 0 refused, 0 failed | loss 0.6 | ndcg@10 0.21 | "
        "eps max 1.100 | 9.0s",
        "WARNING: server.federation: round 2: merchant m2 dropped: restarted mid-round",
        "round 2/3 | 2 trained, 0 refused, 1 failed | eps max 1.5",
        "Traceback (most recent call last):",
        "RuntimeError: the ServerApp failed",
    ]
    assert (tmp_path / "run.log").read_text().splitlines() == lines  # everything is kept


def test_the_progress_bar_draws_without_disturbing_the_lines(tmp_path: Path) -> None:
    from simulations.deployment.run_log import RunLogView

    out = io.StringIO()
    view = RunLogView(tmp_path / "run.log", out=out, progress=True)
    view.feed("INFO    : server.federation: round 1/2: 3 trained | eps max 1.0\n")
    view.close()
    assert "round 1/2 | 3 trained | eps max 1.0" in out.getvalue()


# ------------------------------------------------------------------------- the client


@contextmanager
def _tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS listener that completes handshakes and closes (like a SuperLink's port)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_the_client_probe_names_a_wrong_ca_and_a_tls_platform_for_dev_nodes(
    tmp_path: Path,
) -> None:
    from simulations.deployment.merchant import probe_superlink
    from simulations.deployment.process import free_port

    pki = h.make_pki(tmp_path / "pki", [])
    assert probe_superlink(f"127.0.0.1:{free_port()}", ca_cert=pki.ca / "ca.crt") is None
    with _tls_server(pki.server / "server.crt", pki.server / "server.key") as port:
        address = f"127.0.0.1:{port}"
        assert probe_superlink(address, ca_cert=pki.ca / "ca.crt") is None
        wrong = probe_superlink(address, ca_cert=pki.other_ca / "ca.crt")
        assert wrong is not None and "CERTIFICATE_VERIFY_FAILED" in wrong
        dev = probe_superlink(address, ca_cert=None)
        assert dev is not None and "speaks TLS" in dev
    plain = socket.create_server(("127.0.0.1", 0))
    try:
        threading.Thread(target=lambda: plain.accept()[0].close(), daemon=True).start()
        message = probe_superlink(f"127.0.0.1:{plain.getsockname()[1]}", ca_cert=pki.ca / "ca.crt")
        assert message is not None and "does not speak TLS" in message
    finally:
        plain.close()


def test_a_recent_session_of_this_node_means_rejoin_and_a_live_one_means_refuse(
    tmp_path: Path,
) -> None:
    from simulations.deployment.merchant import NodeSession

    path = tmp_path / "node-session.json"
    NodeSession(42, os.getpid(), time.time()).write(path)
    session = NodeSession.read(path)
    assert session is not None and session.node_id == 42
    assert not session.held_by_live_process()  # our own pid
    other = subprocess.Popen(["bash", "-c", "exec -a fedshop-client sleep 30"])
    try:
        time.sleep(0.2)
        assert NodeSession(42, other.pid, time.time()).held_by_live_process()
        assert not NodeSession(42, other.pid, time.time() - 60).held_by_live_process()
    finally:
        other.kill()
        other.wait()
    path.write_text("not json")
    assert NodeSession.read(path) is None


# ------------------------------------------------------------------------- merchant init


def _export(tmp_path: Path, *, merchants: int = 1, rows: int = 300) -> Path:
    from common.synthetic import SyntheticSpec, generate_events

    frame = generate_events(SyntheticSpec(n_merchants=merchants, events_per_merchant=rows))
    path = tmp_path / "export.csv"
    frame.drop(columns="week").to_csv(path, index=False)
    return path


def _init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", "merchant", "init", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )


def test_merchant_init_creates_everything_a_merchant_needs(tmp_path: Path) -> None:
    from common import certs, keys

    export = _export(tmp_path)
    merchant = str(__import__("pandas").read_csv(export)["merchant_id"].iloc[0])
    out = tmp_path / "merchants" / merchant
    done = _init("--id", merchant, "--events", str(export), "--out", str(out))
    assert done.returncode == 0, done.stderr
    config = MerchantConfig.from_toml(out / "merchant.toml")
    assert config.id == merchant and config.data == out / "events.parquet"
    assert config.signing_key == out / "keys" / f"{merchant}.key"
    assert config.state_dir == out / "state" and config.state_dir.is_dir()
    assert (config.state_dir / "dp-secret").stat().st_size == 32
    assert stat.S_IMODE((config.state_dir / "dp-secret").stat().st_mode) == 0o600
    # Held out in time: training before validation before test, no event in two parts.
    import pandas as pd

    parts = [pd.read_parquet(p) for p in (config.data, config.validation_data, config.test_data)]
    assert all(len(part) for part in parts)
    assert parts[0]["timestamp"].max() < parts[1]["timestamp"].min()
    assert parts[1]["timestamp"].max() < parts[2]["timestamp"].min()
    assert sum(len(part) for part in parts) == len(pd.read_csv(export))
    assert config.cohort.startswith("train:")
    certs.load_node_private_key(out / "keys" / f"{merchant}.node.key")
    keys.load_signing_key(config.signing_key)
    for private in (out / "keys" / f"{merchant}.node.key", config.signing_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    # The public parts are listed with their fingerprints for the operator.
    assert f"{merchant}.node.pub  fingerprint SHA256:" in done.stdout
    assert f"{merchant}.pub  fingerprint sha256:" in done.stdout
    again = _init("--id", merchant, "--events", str(export), "--out", str(out))
    assert again.returncode == 3 and "not empty" in again.stderr


def test_merchant_init_leaves_nothing_behind_on_bad_input(tmp_path: Path) -> None:
    export = _export(tmp_path, merchants=2)
    frame = __import__("pandas").read_csv(export)
    first, second = sorted(frame["merchant_id"].unique())
    out = tmp_path / "merchants" / "m"
    done = _init("--id", first, "--events", str(export), "--out", str(out))
    assert done.returncode == 4 and f"rows of other merchants ({second})" in done.stderr
    only = frame[frame["merchant_id"] == first].drop(columns="merchant_id")
    only.to_csv(tmp_path / "own.csv", index=False)
    bad = (tmp_path / "own.csv").read_text().splitlines()
    bad[3] = bad[3].replace(bad[3].split(",")[2], "yesterday")
    (tmp_path / "own.csv").write_text("\n".join(bad) + "\n")
    done = _init("--id", first, "--events", str(tmp_path / "own.csv"), "--out", str(out))
    assert done.returncode == 4 and "own.csv" in done.stderr and "row" in done.stderr
    assert not (tmp_path / "merchants").exists() or not any((tmp_path / "merchants").iterdir())


def test_merchant_folder_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.split import split_by_span
    from simulations.commands import merchant as command

    export = _export(tmp_path)
    frame = command.read_own_events(export, "merchant-000", {})
    split = split_by_span(
        first_event=frame["timestamp"].min(),
        last_event=frame["timestamp"].max(),
        valid_fraction=0.1,
        test_fraction=0.1,
    )

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(command.certs, "generate_node_key", broken)
    with pytest.raises(OSError, match="disk full"):
        command.create_merchant_folder(
            out=tmp_path / "m",
            merchant_id="merchant-000",
            events=frame,
            split=split,
            epsilon_cap=8.0,
            privacy_unit=MerchantConfig.privacy_unit,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.csv"]
    with pytest.raises(DataValidationError):
        command.read_own_events(export, "someone-else", {})
