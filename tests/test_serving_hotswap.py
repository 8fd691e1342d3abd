"""Hot swap on a real loopback server under a bounded load loop: no request lost, bad versions
refused while the old one keeps serving."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from client.serving.http import create_app
from client.serving.runtime import ServingRuntime
from client.serving.store import ServingStore

sys.path.insert(0, str(Path(__file__).parent / "support"))
from load_loop import LoadLoop
from serving_world import World, make_world


@contextlib.contextmanager
def loopback_service(runtime: ServingRuntime) -> Iterator[int]:
    """The service on 127.0.0.1 in a thread of this process; yields its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(
        uvicorn.Config(create_app(runtime), log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def setup(tmp_path: Path) -> tuple[World, list[int], list[str]]:
    world = make_world(tmp_path)
    versions = [world.register(seed) for seed in (1, 2, 3)]
    world.publish(serving=versions[0])
    customers = [str(c) for c in world.events["customer_id"].unique()[:40]] + ["new-customer"]
    return world, versions, customers


def test_a_swap_under_load_loses_no_request(tmp_path: Path) -> None:
    world, (v1, v2, _), customers = setup(tmp_path)
    runtime = ServingRuntime(world.merchant, store=ServingStore(world.merchant.serving_dir))
    runtime.start()  # the watcher notices publications by itself
    try:
        with loopback_service(runtime) as port, LoadLoop(port, customers).running() as load:
            load.wait_for(300)
            world.publish(serving=v2)  # promotion reaches the mirror; the service swaps
            deadline = time.monotonic() + 30
            while runtime.state.control.version_id != v2 and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.01)
            answered = len(load.answers)
            load.wait_for(answered + 300)
            world.publish(serving=v1)  # and a rollback, the same way
            deadline = time.monotonic() + 30
            while runtime.state.control.version_id != v1 and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.01)
            load.wait_for(len(load.answers) + 300)
    finally:
        runtime.stop()
    assert load.errors == []
    assert len(load.answers) == load.sent  # every request sent was answered
    assert {status for status, _ in load.answers} == {200}
    versions = [version for _, version in load.answers]
    assert versions[0] == v1 and versions[-1] == v1 and v2 in versions
    switches = sum(1 for a, b in itertools.pairwise(versions) if a != b)
    assert switches >= 2  # v1 -> v2 -> v1 (concurrent workers may interleave around a swap)
    assert runtime.metrics.store.value("fedshop_serving_swaps_total") == 3


def test_a_version_that_fails_verification_is_refused_and_the_old_one_keeps_serving(
    tmp_path: Path,
) -> None:
    world, (v1, v2, v3), customers = setup(tmp_path)
    runtime = ServingRuntime(world.merchant, store=ServingStore(world.merchant.serving_dir))
    runtime.refresh()  # refreshed by hand below, to corrupt files between install and load
    mirror = runtime.mirror
    try:
        with loopback_service(runtime) as port, LoadLoop(port, customers).running() as load:
            load.wait_for(100)
            # v2 arrives intact but its weights are damaged on disk before the service loads it.
            world.publish(serving=v2)
            weights = mirror.versions_dir / f"v{v2:06d}.npz"
            data = bytearray(weights.read_bytes())
            data[-100] ^= 0x01
            weights.write_bytes(bytes(data))
            assert runtime.refresh() is False
            assert "SHA-256" in runtime.last_error
            load.wait_for(len(load.answers) + 100)
            # A forged publication file (edited to name v3) does not verify either.
            forged = json.loads(mirror.publication_path.read_text())
            forged["publication"]["serving"] = v3
            mirror.publication_path.write_text(json.dumps(forged))
            assert runtime.refresh() is False
            assert "does not verify" in runtime.last_error
            load.wait_for(len(load.answers) + 100)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", "/healthz")
            health = json.loads(connection.getresponse().read())
            connection.close()
    finally:
        runtime.stop()
    assert load.errors == [] and len(load.answers) == load.sent
    assert {answer for answer in load.answers} == {(200, v1)}  # only ever the old version
    assert health["serving_version"] == v1 and "does not verify" in health["last_refusal"]
    assert runtime.metrics.store.value("fedshop_serving_refused_total") == 2
