"""Transport overhead of a fedshop deployment, measured on this machine.

1. ``tls``: round time of the same workload (a 2-merchant federation exchanging a model-sized
   payload) over TLS with SuperNode authentication versus plaintext (``--insecure-dev``),
   through the real ``fedshop server`` / ``fedshop client`` processes on loopback.
2. ``message-cost``: the fixed cost of one message to a merchant whose ClientApp imports what
   fedshop's does (torch, Opacus, ``client.app``) and answers at once, measured with one
   harness two ways: "per-message process" (Flower's default SuperNode, which starts a new
   ClientApp process for every message: how ``fedshop client`` worked before) and "runner"
   (``fedshop client``: the SuperNode with ``--isolation process`` and fedshop's long-running
   ClientApp runner). Both over TLS, through ``fedshop server``.
3. ``imports``: the start cost of a fresh interpreter importing flwr, torch, opacus and
   fedshop's ``client.app`` (what a per-message ClientApp process pays).

Usage: ``.venv/bin/python benchmarks/transport_overhead.py [--parts tls,message-cost,imports]
[--rounds 4] [--payload-mb 4] [--repeats 3] [--idle-poll S] [--merchant-modes runner]
[--out FILE]``. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import certs  # noqa: E402
from simulations.deployment.process import QUIET_FLOWER_ENV, free_port  # noqa: E402

LAUNCHER = (
    "import sys; from simulations import cli; "
    "cli.COMMAND_MODULES = ('simulations.commands.certs', 'simulations.commands.deploy'); "
    "sys.exit(cli.main(sys.argv[1:]))"
)

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedshop-transport-bench"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "fedshop"

[tool.flwr.app.components]
serverapp = "benchapp:server_app"
clientapp = "benchapp:client_app"

[tool.flwr.app.config]
fedshop-config = ""
"""

APP_SOURCE = """\
import json, os, time
from pathlib import Path
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
if os.environ.get("BENCH_CLIENTAPP_IMPORTS") == "fedshop":
    import client.app  # noqa: F401  (what fedshop's ClientApp costs to start)
from server.exchange import exchange

server_app = ServerApp()
client_app = ClientApp()

@server_app.main()
def main(grid: Grid, context: Context) -> None:
    spec = json.loads(Path(str(context.run_config["fedshop-config"])).read_text())
    while len(list(grid.get_node_ids())) < spec["nodes"]:
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())
    weights = np.zeros(int(spec["payload_mb"] * 2**20 / 4), dtype=np.float32)
    seconds, to_client, back = [], [], []
    for rnd in range(spec["rounds"]):
        t0, sent_at = time.perf_counter(), time.time()
        messages = [Message(content=RecordDict({
            "arrays": ArrayRecord({"w": Array(weights)}),
            "config": ConfigRecord({"round": rnd})}), dst_node_id=n, message_type="train")
            for n in nodes]
        sent = exchange(grid, messages, timeout_s=600)
        seen_at = time.time()
        replies = [r for r in sent.replies if not r.has_error()]
        assert len(replies) == len(nodes), f"a client failed: {sent}"
        weights = replies[0].content["arrays"]["w"].numpy() + 1.0
        seconds.append(time.perf_counter() - t0)
        called = [float(r.content["trace"]["called_at"]) for r in replies]
        to_client.append(max(called) - sent_at)
        back.append(seen_at - max(called))
    out = Path(spec["result"])
    out.write_text(json.dumps({"status": "completed", "round_seconds": seconds,
                               "to_client_s": to_client, "back_s": back}))

@client_app.train()
def train(msg: Message, context: Context) -> Message:
    w = msg.content["arrays"]["w"].numpy()
    trace = ConfigRecord({"called_at": time.time()})
    return Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "trace": trace}),
                   reply_to=msg)
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_FLOWER_ENV)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            argv, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def _fedshop(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    return _start([sys.executable, "-c", LAUNCHER, *args], log, _env(**env))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _per_message_supernode(
    root: Path, index: int, port: int, config: Path, **env: str
) -> subprocess.Popen[bytes]:
    """Flower's default SuperNode: a new ClientApp process (and app install) per message."""
    bin_dir = Path(sys.executable).parent
    argv = [
        str(bin_dir / "flower-supernode"),
        "--superlink",
        f"127.0.0.1:{port}",
        "--root-certificates",
        str(root / "server" / "ca.crt"),
        "--auth-supernode-private-key",
        str(root / "nodes" / f"m{index}.node.key"),
        "--node-config",
        f'merchant-config="{config}"',
        "--port",
        str(free_port()),
    ]
    home = root / f"flwr-m{index}"
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return _start(argv, root / f"m{index}.log", _env(FLWR_HOME=str(home), PATH=path, **env))


def federation_round_times(
    root: Path,
    *,
    tls: bool,
    rounds: int,
    payload_mb: float,
    merchants: str = "runner",
    fedshop_imports: bool = False,
    idle_poll: float | None = None,
) -> dict[str, list[float]]:
    """Run the workload once through ``fedshop server``; merchants are ``fedshop client``
    (``runner``) or Flower's default SuperNode (``per-message``). Per round: its seconds,
    from the push to the ClientApp's call (``to_client_s``) and from there back (``back_s``)."""
    root.mkdir(parents=True)
    app = root / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    (app / "benchapp.py").write_text(APP_SOURCE)
    result = root / "result.json"
    spec = root / "spec.json"
    spec.write_text(
        json.dumps({"nodes": 2, "rounds": rounds, "payload_mb": payload_mb, "result": str(result)})
    )
    port = free_port()
    server_args = [
        "server",
        "--state",
        str(root / "state"),
        "--port",
        str(port),
        "--control-port",
        str(free_port()),
        "--app",
        str(app),
        "--config",
        str(spec),
    ]
    client_tls: list[list[str]] = [["--insecure-dev"]] * 2
    if tls:
        certs.init_ca(root / "ca")
        certs.issue_server_cert(ca_dir=root / "ca", hosts=["127.0.0.1"], out=root / "server")
        for name in ("m1", "m2"):
            certs.generate_node_key(out=root / "nodes", name=name)
        server_args += ["--certs", str(root / "server"), "--nodes-allowlist", str(root / "nodes")]
        client_tls = [
            [
                "--ca-cert",
                str(root / "server" / "ca.crt"),
                "--node-key",
                str(root / "nodes" / f"{name}.node.key"),
            ]
            for name in ("m1", "m2")
        ]
    else:
        server_args += ["--insecure-dev", "--wait-nodes", "2"]
    imports = {"BENCH_CLIENTAPP_IMPORTS": "fedshop"} if fedshop_imports else {}
    procs = [_fedshop(server_args, root / "server.log")]
    try:
        deadline = time.monotonic() + 120
        # Over TLS, nodes must start after their keys are registered: an unknown key is
        # refused at once.
        ready = root / "state" / ("nodes.json" if tls else "superlink.pid")
        while not ready.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"SuperLink did not start; see {root / 'server.log'}")
            time.sleep(0.3)
        for index, extra in enumerate(client_tls, start=1):
            merchant = root / f"m{index}"
            merchant.mkdir()
            config = merchant / "merchant.toml"
            config.write_text(f'[merchant]\nid = "m{index}"\n')
            if merchants == "per-message":
                procs.append(_per_message_supernode(root, index, port, config, **imports))
                continue
            args = ["client", "--config", str(config), "--superlink", f"127.0.0.1:{port}"]
            args += ["--app", str(app), *extra]
            if idle_poll is not None:
                args += ["--idle-poll", str(idle_poll)]
            procs.append(_fedshop(args, root / f"m{index}.log", **imports))
        if procs[0].wait(timeout=1800) != 0:
            raise RuntimeError(f"run failed; see {root / 'server.log'}")
    finally:
        for proc in procs:
            _stop(proc)
    found = json.loads(result.read_text())
    return {key: [float(v) for v in value] for key, value in found.items() if key != "status"}


def import_seconds(statement: str, *, repeats: int) -> float | str:
    """Median wall time of a fresh interpreter running ``statement`` (what a ClientApp pays)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", statement], env=_env(), cwd=REPO, capture_output=True, text=True
        )
        if done.returncode != 0:
            return "failed: " + done.stderr.strip().splitlines()[-1]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tls_overhead(tmp: Path, *, rounds: int, payload_mb: float) -> dict[str, object]:
    per_mode: dict[str, dict[str, object]] = {}
    medians: dict[str, float] = {}
    for mode, tls in (("plaintext", False), ("tls_auth", True)):
        trace = federation_round_times(tmp / mode, tls=tls, rounds=rounds, payload_mb=payload_mb)
        times = trace["round_seconds"]
        medians[mode] = statistics.median(times[1:])
        per_mode[mode] = {"round_seconds": times, "median_s": medians[mode]}
    return {
        "payload_mb": payload_mb,
        "rounds": per_mode,
        "tls_overhead_fraction": medians["tls_auth"] / medians["plaintext"] - 1.0,
        "note": "median over rounds 2..N (round 1 includes starting the ClientApp)",
    }


MERCHANT_MODES = ("per-message", "runner")

# One line of the proxy's access log (simulations/deployment/proxy.py, ``log_format fleet``).
FLEET_LINE = re.compile(
    r'"POST (?P<path>\S+) [^"]*" (?P<status>\d+) .* request_s=(?P<seconds>[\d.]+)'
)


def fleet_request_seconds(access_log: Path) -> dict[str, dict[str, float]]:
    """Per Fleet API call (the last part of its path): how many, median and max seconds at
    nginx, which equal the SuperLink's own time on loopback (docs/transport.md)."""
    seconds: dict[str, list[float]] = {}
    for line in access_log.read_text(encoding="utf-8").splitlines():
        found = FLEET_LINE.search(line)
        if found is not None:
            call = found["path"].rstrip("/").rsplit("/", 1)[-1]
            seconds.setdefault(call, []).append(float(found["seconds"]))
    return {
        call: {"count": len(values), "median_s": statistics.median(values), "max_s": max(values)}
        for call, values in sorted(seconds.items())
    }


def message_cost(
    tmp: Path, *, rounds: int, idle_poll: float | None, modes: tuple[str, ...] = MERCHANT_MODES
) -> dict[str, object]:
    """Round time of one tiny message to each of 2 merchants whose ClientApp imports
    fedshop's: the fixed cost per message, per-message process versus runner."""
    from machine_load import machine_jiffies, stolen_share

    found: dict[str, object] = {}
    for mode in modes:
        machine_before = machine_jiffies()
        trace = federation_round_times(
            tmp / f"cost-{mode}",
            tls=True,
            rounds=rounds,
            payload_mb=0.01,
            merchants=mode,
            fedshop_imports=True,
            idle_poll=idle_poll if mode == "runner" else None,
        )
        found[mode] = {
            **trace,
            **{f"median_{key}": statistics.median(values[1:]) for key, values in trace.items()},
            "stolen_cpu_share": stolen_share(machine_before),
            "fleet_requests": fleet_request_seconds(
                tmp / f"cost-{mode}" / "state" / "logs" / "proxy-access.log"
            ),
        }
    found["note"] = "median over rounds 2..N; round 1 includes the runner's own start"
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="tls,message-cost,imports")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--payload-mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle-poll", type=float, help="fedshop client --idle-poll (default 1)")
    parser.add_argument(
        "--merchant-modes",
        default=",".join(MERCHANT_MODES),
        help="message-cost: which merchant sides to run (per-message, runner)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    modes = tuple(mode.strip() for mode in args.merchant_modes.split(",") if mode.strip())
    if not modes or set(modes) - set(MERCHANT_MODES):
        parser.error(f"--merchant-modes must name some of {', '.join(MERCHANT_MODES)}")
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = parts - {"tls", "message-cost", "imports"}
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}")
    from machine_load import reference_work_seconds

    report: dict[str, object] = {
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "reference_work_s": reference_work_seconds(),
    }
    with tempfile.TemporaryDirectory(prefix="fedshop-transport-") as tmp:
        if "tls" in parts:
            report["tls"] = tls_overhead(Path(tmp), rounds=args.rounds, payload_mb=args.payload_mb)
            print(json.dumps(report, indent=2), flush=True)
        if "message-cost" in parts:
            report["message_cost"] = message_cost(
                Path(tmp), rounds=max(args.rounds, 4), idle_poll=args.idle_poll, modes=modes
            )
            print(json.dumps(report, indent=2), flush=True)
    if "imports" in parts:
        report["clientapp_start_s"] = {
            name: import_seconds(stmt, repeats=args.repeats)
            for name, stmt in {
                "python": "pass",
                "flwr.clientapp": "import flwr.clientapp",
                "torch": "import torch",
                "opacus": "import opacus",
                "client.app": "import client.app",
            }.items()
        }
    report["load_avg_1m_end"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
