"""End to end on a real sample of one's own data: three Complete Journey stores exported as a
CSV with a shop system's column names and no attribute columns, simulated with ``--map``,
interrupted and resumed, then audited. Also checks that the default output is quiet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from common.completejourney import load_all

pytestmark = pytest.mark.slow

STORES = ["store-370", "store-374", "store-31642"]  # about 10,500 events each, all 53 weeks
EXPORT_NAMES = {
    "merchant_id": "store",
    "customer_id": "household",
    "product_id": "sku",
    "timestamp": "sold_at",
    "quantity": "units",
    "price": "unit_price",
}
MAP = [f"{source}={field}" for field, source in EXPORT_NAMES.items()] + ["register=-"]
NOISE = re.compile(r"DEBUG|DeprecationWarning|DEPRECATED|FutureWarning|ClientAppActor|pid=")


def export_sample(path: Path) -> Path:
    """What a retailer's export could look like: own names, no category/department/brand."""
    events = load_all()
    sample = events[events["merchant_id"].isin(STORES)]
    export = sample[list(EXPORT_NAMES)].rename(columns=EXPORT_NAMES)
    export["sold_at"] = export["sold_at"].dt.strftime("%Y-%m-%d %H:%M:%S")
    export["register"] = "1"
    export.sample(frac=1.0, random_state=7).to_csv(path, index=False)  # any row order
    return path


def fedshop(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_own_csv_with_other_names_simulates_resumes_and_audits(tmp_path: Path) -> None:
    data = export_sample(tmp_path / "orders.csv")
    maps = [arg for item in MAP for arg in ("--map", item)]
    first = fedshop(
        "simulate",
        "--data",
        str(data),
        *maps,
        "--set",
        "federation.rounds=2",
        "--out",
        "run",
        "--stop-after-round",
        "1",
        cwd=tmp_path,
    )
    run = tmp_path / "run"
    assert "stopped early" in first.stdout
    second = fedshop("simulate", "--resume", "run", cwd=tmp_path)
    output = first.stdout + first.stderr + second.stdout + second.stderr
    assert not NOISE.search(output), NOISE.search(output)
    assert second.stdout.count("trained/refused/failed") == 1  # the per-round table, once
    assert "test period (federated evaluation" in second.stdout and "complete" in second.stdout

    assert json.loads((run / "merchants.json").read_text()) == sorted(STORES)
    split = json.loads((run / "split.json").read_text())
    assert split["rule"] == "span" and split["test"]["start"].startswith("2017-11-25")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["aggregated_rounds"] == 2
    ours = summary["test_methods"]["global+local"]["means"]["ndcg@10"]
    assert 0.0 < ours <= 1.0 and set(summary["test_case_counts"]) == set(STORES)
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [len(r["trained"]) for r in rounds] == [3, 3]

    ledgers = [str(p) for p in sorted(run.glob("merchants/*/state/ledger.sqlite"))]
    verified = fedshop(
        "audit",
        "verify",
        "--ledger",
        *ledgers,
        "--server-ledger",
        "server/ledger.sqlite",
        "--keys",
        "keys",
        cwd=run,
    )
    assert "VERIFIED: 6 entries, 3 merchants" in verified.stdout
    budgets = fedshop("audit", "budgets", "--ledger", *ledgers, "--keys", "keys", cwd=run)
    rows = [line for line in budgets.stdout.splitlines() if line.startswith("store-")]
    assert len(rows) == 3 and all(f"train:..{split['train']['end'][:10]}" in r for r in rows)


def test_own_folder_streams_held_out_slices_online(tmp_path: Path) -> None:
    """``--online`` on own files: weekly slices of the held-out time reach the inboxes."""
    from test_own_data import MAP as SHOP_MAP
    from test_own_data import shop_frames, write_folder

    write_folder(tmp_path / "shops", shop_frames(3, 1500))
    small = ["model.product_buckets=2048", "model.embedding_dim=8", "model.hidden_dim=16"]
    sets = ["data.min_rows=1", "federation.rounds=1", "training.batch_size=256", *small]
    result = fedshop(
        "simulate",
        "--data",
        "shops",
        *[arg for item in SHOP_MAP for arg in ("--map", item)],
        *[arg for item in sets for arg in ("--set", item)],
        "--out",
        "run",
        "--online",
        "44-46",
        cwd=tmp_path,
    )
    assert "online slices 44-46" in result.stdout
    weeks = json.loads((tmp_path / "run" / "online.json").read_text())["weeks"]
    assert [w["week"] for w in weeks] == [44, 45, 46]
    assert all(len(w["trained"]) == 3 for w in weeks)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    inbox = sorted((tmp_path / "run" / "merchants" / "merchant-000" / "inbox").rglob("*.parquet"))
    assert len(inbox) == 3, inbox
    streamed = pd.concat(pd.read_parquet(path) for path in inbox)
    assert streamed["timestamp"].min() >= pd.Timestamp(split["train"]["end"])  # no training
