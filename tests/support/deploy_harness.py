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

from common import certs
from simulations.deployment.process import QUIET_FLOWER_ENV

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
    config.write_text(f'[merchant]\nid = "{name}"\n', encoding="utf-8")
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


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    frontier = [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


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
