"""Shared fixtures: small, fast configurations and provisioned synthetic federations."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.flower_env import quiet_flower_environment

quiet_flower_environment()

SMALL = [
    "data.source=synthetic",
    "data.top_n=3",
    "data.synthetic_events_per_merchant=3000",
    "model.product_buckets=2048",
    "model.category_buckets=64",
    "model.embedding_dim=8",
    "model.hidden_dim=16",
    "training.batch_size=256",
    "federation.rounds=3",
    "federation.min_merchants=2",
]


@pytest.fixture(scope="session")
def small_overrides() -> list[str]:
    return list(SMALL)


@pytest.fixture
def small_layout(tmp_path: Path):
    from common.config import RunConfig
    from common.configparse import apply_overrides
    from simulations.provision import provision

    config = RunConfig.from_dict(apply_overrides({}, SMALL))
    return provision(config, tmp_path / "run")
