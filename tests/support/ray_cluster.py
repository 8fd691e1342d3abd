"""A Ray cluster of separate ``ray start`` processes on loopback, for tests of multi-node runs.

Each node is one ``ray start --block`` process (head first, then workers joining it) with its
own ports and one shared private temp dir; stopping sends SIGTERM to each ``ray start`` by PID
(it shuts its node down), then kills by PID whatever process still names that temp dir on its
command line (raylets, GCS, workers), so nothing of the cluster outlives the test and nothing
else on the machine is touched (no ``ray stop``, which stops every Ray of the user).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))

# The check runs as a Ray driver of its own. Ray's public state API (ray.util.state) needs the
# dashboard, which flwr[simulation]'s minimal Ray does not install; the GCS keeps the task
# events itself, and this reads them through the accessor the state API is built on.
TASKS_BY_NODE = """
import json, sys
import ray
from ray._private.state import state
from ray.core.generated import gcs_pb2

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
tasks = {}
for raw in state._connect_and_get_accessor().get_task_events():
    event = gcs_pb2.TaskEvents.FromString(raw)
    if not event.task_info.func_or_class_name.endswith(sys.argv[2]):
        continue
    node = event.state_updates.node_id or event.task_info.node_id
    if node:
        tasks.setdefault(event.task_id.hex(), node.hex())
by_node = {}
for node in tasks.values():
    by_node[node] = by_node.get(node, 0) + 1
print(json.dumps({"alive": alive, "tasks_by_node": by_node}))
ray.shutdown()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


@dataclass
class PortBook:
    """Ports handed to the cluster's processes, each handed out once.

    The OS may give a just-released port to the next ``bind(0)``, and a worker-port range picked
    next to it may cover ports already given to another component: Ray then refuses to start.
    """

    taken: set[int] = field(default_factory=set)

    def single(self) -> int:
        for _ in range(1000):
            port = free_port()
            if port not in self.taken:
                self.taken.add(port)
                return port
        raise RuntimeError("no free port on loopback")

    def block(self, size: int) -> int:
        """First port of ``size`` consecutive free ports none of which was handed out.

        Drawn below the OS's ephemeral range, so that outgoing connections (which take their
        local port from that range) cannot grab a worker port before a worker binds it.
        """
        first_ephemeral = ephemeral_range()[0]
        rng = random.Random()
        for _ in range(1000):
            low = rng.randrange(10000, max(10001, first_ephemeral - size))
            ports = range(low, low + size)
            if not self.taken.intersection(ports) and all(bindable(p) for p in ports):
                self.taken.update(ports)
                return low
        raise RuntimeError(f"no {size} consecutive free ports on loopback")


@dataclass
class RayCluster:
    temp_dir: Path
    ports: PortBook
    head_port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.head_port}"

    def _start(self, args: list[str], log: str) -> None:
        ports = {
            flag: self.ports.single()
            for flag in (
                "--node-manager-port",
                "--object-manager-port",
                "--metrics-export-port",
                "--runtime-env-agent-port",
                "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port",
            )
        }
        low = self.ports.block(41)
        command = [
            RAY,
            "start",
            *args,
            "--num-cpus=1",
            "--num-gpus=0",
            "--node-ip-address=127.0.0.1",
            "--object-store-memory=150000000",
            "--disable-usage-stats",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 40}",
            *(f"{flag}={port}" for flag, port in ports.items()),
            "--block",
        ]
        out = open(self.temp_dir / log, "wb")  # noqa: SIM115 - closed with the process
        self.processes.append(
            subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                start_new_session=True,
            )
        )

    def start(self, workers: int = 1, timeout_s: float = 120.0) -> None:
        self._start(
            [
                "--head",
                f"--port={self.head_port}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                f"--ray-client-server-port={self.ports.single()}",
            ],
            "head.log",
        )
        self.wait_for_nodes(1, timeout_s)
        for i in range(workers):
            self._start(
                [f"--address={self.address}", f"--temp-dir={self.temp_dir}"], f"worker-{i}.log"
            )
        self.wait_for_nodes(1 + workers, timeout_s)

    def run_driver(self, script: str, *args: str, timeout_s: float = 120.0) -> str:
        result = subprocess.run(
            [sys.executable, "-c", script, self.address, *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise RuntimeError(f"Ray driver failed: {result.stderr[-3000:]}\n{self.logs()}")
        return result.stdout.strip().splitlines()[-1]

    def alive_nodes(self) -> list[str]:
        script = (
            "import json, sys, ray\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
            "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))\n"
            "ray.shutdown()\n"
        )
        return list(json.loads(self.run_driver(script)))

    def wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"ray start exited {process.returncode}\n{self.logs()}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray cluster did not reach {count} nodes\n{self.logs()}")
            time.sleep(1.0)

    def tasks_by_node(self, task_name: str) -> dict[str, object]:
        """Alive node ids and, per node id, how many tasks named ``*task_name`` ran there."""
        return dict(json.loads(self.run_driver(TASKS_BY_NODE, task_name)))

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
            for log in sorted(self.temp_dir.glob("*.log"))
        )

    def stop(self) -> None:
        for process in reversed(self.processes):  # workers first, then the head
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        for pid in leftover_pids(self.temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def leftover_pids(temp_dir: Path) -> list[int]:
    """Processes whose command line names ``temp_dir`` (this cluster's, and only its)."""
    mark = str(temp_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def new_cluster() -> RayCluster:
    # Ray's unix socket paths must stay short: a temp dir directly under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    ports = PortBook()
    return RayCluster(temp_dir=temp_dir, ports=ports, head_port=ports.single())
