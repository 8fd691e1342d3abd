"""``fedshop simulate --online`` end to end through Flower's simulation engine (Ray)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def simulate(out: Path, overrides: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", *sets, "--out", str(out), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_simulate_online_streams_weeks_through_inboxes(tmp_path, small_overrides):
    run = tmp_path / "run"
    overrides = [o for o in small_overrides if not o.startswith("federation.rounds")]
    result = simulate(run, [*overrides, "federation.rounds=2"], "--online", "41-43")
    assert "online slices 41-43 (prequential, federated)" in result.stdout
    payload = json.loads((run / "online.json").read_text())
    weeks = payload["weeks"]
    assert [w["week"] for w in weeks] == [41, 42, 43]
    assert [w["round"] for w in weeks] == [3, 4, 5]  # continue after the 2 offline rounds
    for week in weeks:
        assert len(week["trained"]) == 3, week
        assert 0.0 < week["prequential"]["ndcg@10"] <= 1.0
        assert set(week["epsilon_remaining"]) == {"merchant-000", "merchant-001", "merchant-002"}
    rows = list(csv.DictReader((run / "online.csv").open()))
    assert [r["week"] for r in rows] == ["41", "42", "43"]
    registry = run / "server" / "registry" / "versions"
    assert len(list(registry.glob("v*.manifest.json"))) == 4  # offline model + 3 candidates
    cohorts = run / "merchants" / "merchant-000" / "inbox" / "accepted"
    assert sorted(p.name for p in cohorts.glob("*.parquet")) == [
        "stream-000001.parquet",
        "stream-000002.parquet",
        "stream-000003.parquet",
    ]
