"""A simulation attached to a running two-node Ray cluster (head and worker, each its own
``ray start`` process on loopback with one CPU): the merchants' ClientApps run on both nodes,
and the result is the single-machine result of the same run directory."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from common.configparse import apply_overrides
from common.keys import load_signing_key
from common.ledger import MerchantLedger
from simulations.provision import RunLayout, provision

sys.path.insert(0, str(Path(__file__).parent / "support"))
from ray_cluster import RayCluster, new_cluster

from tests.test_simulation_e2e import fedshop, final_arrays

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_cluster() -> Iterator[RayCluster]:
    cluster = new_cluster()
    try:
        cluster.start(workers=1)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def ledger_epsilons(run: Path) -> dict[str, list[float]]:
    layout = RunLayout(run)
    out = {}
    for merchant_id in layout.merchant_ids():
        merchant = layout.merchant_config(merchant_id)
        with MerchantLedger.open(
            merchant.ledger_path,
            merchant_id=merchant_id,
            signing_key=load_signing_key(merchant.signing_key),
        ) as ledger:
            out[merchant_id] = [e.release.epsilon_after for e in ledger.entries()]
    return out


def test_simulation_on_a_two_node_ray_cluster_equals_the_single_machine_run(
    tmp_path: Path, small_overrides: list[str], ray_cluster: RayCluster
) -> None:
    overrides = [*small_overrides, "federation.rounds=2", "data.top_n=4"]
    provision(RunConfig.from_dict(apply_overrides({}, overrides)), tmp_path / "cluster")
    shutil.copytree(tmp_path / "cluster", tmp_path / "local")  # the same merchants' secrets

    nodes = ray_cluster.alive_nodes()
    assert len(nodes) == 2
    on_cluster = fedshop(
        "simulate", "--resume", str(tmp_path / "cluster"), "--ray-address", ray_cluster.address
    )
    assert on_cluster.returncode == 0, on_cluster.stderr[-3000:] + ray_cluster.logs()
    ran = ray_cluster.tasks_by_node("ClientAppActor.run")
    assert sorted(ran["alive"]) == sorted(nodes)  # type: ignore[arg-type]
    by_node = ran["tasks_by_node"]
    assert isinstance(by_node, dict) and set(by_node) == set(nodes), by_node
    # 4 merchants x (2 training + 2 validation rounds + the final test) messages
    assert sum(by_node.values()) == 4 * 5 and min(by_node.values()) >= 1

    local = fedshop("simulate", "--resume", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]

    a, b = final_arrays(tmp_path / "cluster"), final_arrays(tmp_path / "local")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    eps = ledger_epsilons(tmp_path / "cluster")
    assert eps == ledger_epsilons(tmp_path / "local") and all(len(v) == 2 for v in eps.values())
    runs = ("cluster", "local")
    summaries = [json.loads((tmp_path / r / "summary.json").read_text()) for r in runs]
    assert summaries[0]["model_sha256"] == summaries[1]["model_sha256"]
    assert summaries[0]["test"] == summaries[1]["test"]
    rounds = [json.loads((tmp_path / r / "metrics.json").read_text())["rounds"] for r in runs]
    for x, y in zip(*rounds, strict=True):
        for key in ("trained", "epsilon", "metrics"):
            assert x[key] == y[key], key
