"""Child processes that are always stopped: own process group, log file, parent-death signal.

Flower's SuperLink and SuperNode each start helpers (SuperExec, ServerApp, ClientApp
processes). Starting every child in its own session lets us stop the whole tree with one
``killpg``; asking the kernel to signal the child when we die (``PR_SET_PDEATHSIG``) keeps a
``kill -9`` of ``fedshop`` from leaving an orphaned SuperLink holding the port.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Self

from common.errors import DeploymentError
from common.flower_env import QUIET_FLOWER_ENV

_PR_SET_PDEATHSIG = 1


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process we start: offline, with a private FLWR_HOME."""
    env = dict(os.environ if base is None else base)
    env.update(QUIET_FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
    venv_bin = str(Path(sys.executable).parent)
    if venv_bin not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([venv_bin, *filter(None, [env.get("PATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def flower_bin(name: str) -> str:
    """The Flower executable next to this interpreter (the venv), else whatever PATH finds."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the finally blocks still stop children
        pass


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


@dataclass
class ManagedProcess:
    """One supervised child: its process group is its PID."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    log_offset: int = 0  # the log file is appended to: only what this process wrote counts

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as handle:
            handle.seek(self.log_offset)
            return handle.read().decode("utf-8", errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, *, timeout: float) -> None:
        """Block until the log matches ``pattern``; raise if the process exits or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if regex.search(self.log_text()):
                return
            if not self.alive():
                raise DeploymentError(
                    f"{self.name} exited with code {self.popen.returncode} before it was ready;"
                    f" last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.2)
        raise DeploymentError(f"{self.name} was not ready after {timeout:.0f} s: {self.log_tail()}")

    def signal_group(self, sig: int) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, *, grace: float = 10.0) -> int | None:
        """SIGTERM the whole group, SIGKILL what is left after ``grace`` seconds; reap.

        Flower's SuperLink starts its SuperExec in a session of its own, out of reach of the
        group signal; every descendant seen before stopping is killed as well.
        """
        helpers = descendants(self.pid)
        self.signal_group(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        self.signal_group(signal.SIGKILL)  # helpers that ignored SIGTERM or outlived the leader
        for pid in [*helpers, *descendants(self.pid)]:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            return self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return None


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path | None,
    cwd: Path | None = None,
    relay: bool = False,
) -> ManagedProcess:
    """Start ``argv`` in a new session; output goes to ``log_path`` (or is inherited).

    With ``relay`` the output is a pipe that :func:`relay_until_exit` copies to our stdout.
    """
    if relay and log_path is not None:
        raise ValueError("relay and log_path are exclusive")
    handle: IO[bytes] | None = None
    offset = 0
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = log_path.open("ab")
        offset = handle.tell()
    try:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if relay else handle,
            stderr=subprocess.STDOUT if handle is not None or relay else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except FileNotFoundError:
        raise DeploymentError(
            f"cannot start {name}: {argv[0]} not found (is flwr installed?)"
        ) from None
    finally:
        if handle is not None:
            handle.close()
    return ManagedProcess(name=name, popen=popen, log_path=log_path, log_offset=offset)


class OutputRelay:
    """Copies a relayed child's output to our stdout line by line, noting marker strings.

    Helpers the child started may hold the pipe open after it is gone, so the copy runs in
    a thread of its own and :meth:`finish` stops the whole group before joining it.
    """

    _write_lock = threading.Lock()  # lines of several children never interleave mid-line

    def __init__(self, process: ManagedProcess, markers: Sequence[str] = ()) -> None:
        if process.popen.stdout is None:
            raise ValueError(f"{process.name} was not started with relay=True")
        self.process = process
        self._markers = {marker: marker.encode() for marker in markers}
        self._seen: dict[str, float] = {}
        self._thread = threading.Thread(
            target=self._copy, name=f"relay-{process.name}", daemon=True
        )

    def start(self) -> Self:
        self._thread.start()
        return self

    def seen(self, marker: str) -> bool:
        return marker in self._seen

    def on_line(self, line: bytes) -> None:
        """Hook for subclasses that read more than markers from the output."""

    def _copy(self) -> None:
        stream = self.process.popen.stdout
        assert stream is not None
        out = sys.stdout.buffer
        for line in iter(stream.readline, b""):
            for marker, needle in self._markers.items():
                if needle in line:
                    self._seen.setdefault(marker, time.monotonic())
            self.on_line(line)
            with self._write_lock:
                out.write(line)
                out.flush()

    def finish(self, *, grace: float = 10.0) -> int | None:
        """Stop the child's group (if still running), finish copying, return its exit code."""
        code = self.process.stop(grace=grace)
        self._thread.join(timeout=5.0)
        stream = self.process.popen.stdout
        if stream is not None:
            stream.close()
        return code


def relay_until_exit(process: ManagedProcess, marker: str) -> tuple[int, bool]:
    """Copy a relayed process's output until its leader exits; the exit code and whether
    ``marker`` appeared."""
    relay = OutputRelay(process, [marker]).start()
    try:
        code = process.popen.wait()
    finally:
        relay.finish()
    return code, relay.seen(marker)


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (systemd stop, ``kill``) into KeyboardInterrupt so ``finally`` blocks run."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
