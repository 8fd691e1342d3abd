"""End to end through Flower's simulation engine (Ray), each run in its own process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w

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
    methods = summary["test_methods"]
    assert set(methods) >= {"global", "global+local", "p-topfreq", "g-topfreq"}
    ours = methods["global+local"]
    low, high = ours["ci95"]["ndcg@10"]
    assert 0.0 < low <= ours["means"]["ndcg@10"] <= high <= 1.0
    assert set(ours["per_merchant"]) == set(RunLayout(run).merchant_ids())
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
    """One provisioned run directory (its merchants' secrets included), copied: run through,
    and stopped after round 1 then resumed, give the identical model."""
    from common.config import RunConfig
    from common.configparse import apply_overrides
    from simulations.provision import provision

    provision(RunConfig.from_dict(apply_overrides({}, small_overrides)), tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    assert fedshop("simulate", "--resume", str(tmp_path / "full")).returncode == 0
    stopped = fedshop("simulate", "--resume", str(tmp_path / "cut"), "--stop-after-round", "1")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not (tmp_path / "cut" / "model" / "final.npz").exists()
    result = fedshop("simulate", "--resume", str(tmp_path / "cut"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_arrays(tmp_path / "full"), final_arrays(tmp_path / "cut")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "cut" / "metrics.json").read_text())["rounds"]
    assert [row["round"] for row in history] == [1, 2, 3]


def test_two_runs_of_the_same_command_release_different_models(tmp_path):
    """Fresh merchants, fresh secrets: the platform's configuration and seed do not determine
    the DP noise, so the same command twice gives two different models."""
    command = ["data.source=synthetic", "data.top_n=3", "federation.rounds=1"]
    simulate(tmp_path / "a", command)
    simulate(tmp_path / "b", command)
    hashes = [json.loads((tmp_path / r / "summary.json").read_text())["model_sha256"] for r in "ab"]
    assert hashes[0] != hashes[1]


def test_refusing_merchant_is_dropped_and_round_goes_on(tmp_path, small_overrides):
    run = tmp_path / "run"
    from common.config import RunConfig
    from common.configparse import apply_overrides
    from simulations.provision import provision

    fixed = [*small_overrides, "privacy.noise_multiplier=2.0"]  # calibration would just add noise
    layout = provision(RunConfig.from_dict(apply_overrides({}, fixed)), run)
    stingy = layout.merchant_ids()[0]
    toml = layout.merchants / stingy / "merchant.toml"
    table = tomllib.loads(toml.read_text(encoding="utf-8"))
    assert table["merchant"]["epsilon_cap"] == 3.0
    table["merchant"]["epsilon_cap"] = 0.05
    toml.write_text(tomli_w.dumps(table), encoding="utf-8")
    assert layout.merchant_config(stingy).epsilon_cap == 0.05
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
