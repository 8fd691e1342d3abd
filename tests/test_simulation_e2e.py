"""End to end through Flower's simulation engine (Ray), each run in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.keys import load_signing_key
from common.ledger import MerchantLedger
from simulations.provision import RunLayout

pytestmark = pytest.mark.slow


def fedshop(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "simulations.cli", *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def simulate(out: Path, overrides: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    result = fedshop("simulate", *sets, "--out", str(out), *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def final_arrays(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "model" / "final.npz", allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def test_simulation_trains_records_and_reports(tmp_path, small_overrides):
    run = tmp_path / "run"
    result = simulate(run, small_overrides)
    summary = json.loads((run / "summary.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())["rounds"]
    assert summary["completed"] and len(metrics) == 3
    assert all(len(row["trained"]) == 3 and row["aggregated"] for row in metrics)
    assert 0.5 < summary["test"]["auc"] <= 1.0
    cap = 3.0
    layout = RunLayout(run)
    for merchant_id in layout.merchant_ids():
        merchant = layout.merchant_config(merchant_id)
        with MerchantLedger.open(
            merchant.ledger_path,
            merchant_id=merchant_id,
            signing_key=load_signing_key(merchant.signing_key),
        ) as ledger:
            log = ledger.entries()
        assert [e.release.round for e in log] == [1, 2, 3]
        assert metrics[-1]["epsilon"][merchant_id] == pytest.approx(log[-1].release.epsilon_after)
        assert log[-1].release.epsilon_after <= cap
    assert (run / "metrics.csv").read_text().count("\n") == 4
    assert (run / "plots" / "rounds.png").stat().st_size > 10_000
    assert "eps max" in result.stdout and "test period" in result.stdout


def test_resume_equals_uninterrupted(tmp_path, small_overrides):
    simulate(tmp_path / "full", small_overrides)
    simulate(tmp_path / "cut", small_overrides, "--stop-after-round", "1")
    assert not (tmp_path / "cut" / "model" / "final.npz").exists()
    result = fedshop("simulate", "--resume", str(tmp_path / "cut"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_arrays(tmp_path / "full"), final_arrays(tmp_path / "cut")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "cut" / "metrics.json").read_text())["rounds"]
    assert [row["round"] for row in history] == [1, 2, 3]


def test_refusing_merchant_is_dropped_and_round_goes_on(tmp_path, small_overrides):
    run = tmp_path / "run"
    from common.config import RunConfig
    from common.configparse import apply_overrides
    from simulations.provision import provision

    fixed = [*small_overrides, "privacy.noise_multiplier=2.0"]  # calibration would just add noise
    layout = provision(RunConfig.from_dict(apply_overrides({}, fixed)), run)
    stingy = layout.merchant_ids()[0]
    toml = layout.merchants / stingy / "merchant.toml"
    toml.write_text(toml.read_text().replace("epsilon_cap = 3.0", "epsilon_cap = 0.05"))
    result = fedshop("simulate", "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert all(stingy in row["refused"] and len(row["trained"]) == 2 for row in rounds)
    merchant = layout.merchant_config(stingy)
    with MerchantLedger.open(
        merchant.ledger_path, merchant_id=stingy, signing_key=load_signing_key(merchant.signing_key)
    ) as ledger:
        assert ledger.entries() == []
    assert not merchant.outbox.exists() or not any(merchant.outbox.iterdir())
