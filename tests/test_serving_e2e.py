"""End to end: a small simulation trains a model; the platform publishes it to a merchant, whose
`fedshop serve` answers on loopback and swaps to a newer version under load."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from client.serving.history import load_events
from common.arrays_io import npz_to_arrays
from common.config import RunConfig
from common.keys import load_signing_key
from common.nextbasket.spec import describe
from server.publish import Publisher
from server.registry import ModelRegistry
from simulations.provision import RunLayout
from simulations.serving import deliver

sys.path.insert(0, str(Path(__file__).parent / "support"))
from load_loop import LoadLoop

pytestmark = pytest.mark.slow


def fedshop(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return dict(json.loads(response.read()))


def test_a_simulated_model_is_served_and_swapped_on_loopback(tmp_path, small_overrides):
    run = tmp_path / "run"
    sets = [a for o in [*small_overrides, "federation.rounds=1"] for a in ("--set", o)]
    result = fedshop("simulate", *sets, "--out", str(run))
    assert result.returncode == 0, result.stderr[-3000:]

    layout = RunLayout(run)
    config = RunConfig.from_toml(layout.config)
    key = load_signing_key(layout.platform_keys / "platform.key")
    registry = ModelRegistry(run / "registry", signing_key=key, verify_key=key.public_key())
    trained = npz_to_arrays((run / "model" / "final.npz").read_bytes())
    first = registry.register(
        trained, parent=None, round=1, merchants=[], metrics={}, privacy={}
    ).id
    registry.promote(first, reason="offline model")
    publisher = Publisher(registry, key, model=describe(config.model))
    merchants = [layout.merchant_config(m) for m in layout.merchant_ids()]
    report = deliver(publisher.sign(reason="offline model"), merchants)
    assert report.installed == {m.id: first for m in merchants}

    shop = merchants[0]
    customers = sorted(load_events(shop).events["customer_id"].astype(str).unique())[:30]
    toml = layout.merchants / shop.id / "merchant.toml"
    serve = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "serve", "--config", str(toml), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        body = get(f"{base}/recommendations?customer={customers[0]}&k=10")
        assert body["model_version"] == first and body["known_customer"] is True
        assert len(body["items"]) == 10
        assert get(f"{base}/recommendations?customer=someone-new")["known_customer"] is False

        # A second version (one more local step's worth of change) is promoted and published
        # while a bounded load loop runs: the service swaps without losing a request.
        rng = np.random.default_rng(0)
        nudged = {k: v + rng.normal(0, 1e-2, v.shape).astype(v.dtype) for k, v in trained.items()}
        second = registry.register(
            nudged, parent=first, round=2, merchants=[], metrics={}, privacy={}
        ).id
        with LoadLoop(port, customers, limit=5000, workers=2).running() as load:
            load.wait_for(100)
            registry.promote(second, reason="newer")
            assert deliver(publisher.sign(reason="newer"), [shop]).installed == {shop.id: second}
            deadline = time.monotonic() + 60
            while get(f"{base}/healthz")["serving_version"] != second:
                assert time.monotonic() < deadline, "no swap within 60 s"
                time.sleep(0.2)
            load.wait_for(len(load.answers) + 100)
        assert load.errors == [] and len(load.answers) == load.sent
        assert {status for status, _ in load.answers} == {200}
        assert {version for _, version in load.answers} == {first, second}
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
        assert "fedshop_serving_swaps_total 2" in metrics
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=60)
    assert code == 0, serve.stderr.read() if serve.stderr else ""
