"""A platform registry and one merchant with synthetic events, for the serving tests.

Versions are the next-basket scorer's shared weights with random values (the shapes of
:class:`~common.nextbasket.model.BasketScorer`); they are published to the merchant through the
same handler its ClientApp runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from client.merchant import MerchantConfig
from client.serving.config import ServingConfig
from common.events import REQUIRED_COLUMNS, write_events
from common.nextbasket.model import BasketScorer, shared_arrays
from common.nextbasket.spec import ScorerSpec
from common.synthetic import SyntheticSpec, generate_events
from server.publish import Publisher, PublishReport
from server.registry import ModelRegistry
from simulations.serving import deliver, platform_registry, publisher_for

SPEC = ScorerSpec(product_buckets=2048, category_buckets=64, department_buckets=16, embedding_dim=4)


def random_arrays(seed: int, spec: ScorerSpec = SPEC) -> dict[str, np.ndarray]:
    """Every shared array of the scorer, drawn at random (so that every part of it matters)."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(scale=0.3, size=value.shape).astype(np.float32)
        for name, value in shared_arrays(BasketScorer(spec)).items()
    }


@dataclass
class World:
    root: Path
    merchant: MerchantConfig
    events: pd.DataFrame
    registry: ModelRegistry
    publisher: Publisher

    def register(self, seed: int) -> int:
        return self.registry.register(
            random_arrays(seed), parent=None, round=seed, merchants=[], metrics={}, privacy={}
        ).id

    def publish(self, *, serving: int, candidate: int | None = None) -> PublishReport:
        current = self.registry.promoted()
        if current is None or current.id != serving:
            self.registry.promote(serving, reason="test")
        signed = self.publisher.sign(reason="test", candidate=candidate)
        return deliver(signed, [self.merchant])

    def with_serving(self, **changes: object) -> MerchantConfig:
        self.merchant = replace(self.merchant, serving=replace(self.merchant.serving, **changes))
        return self.merchant


def make_world(root: Path, *, seed: int = 7, customers: int = 150) -> World:
    events = generate_events(
        SyntheticSpec(
            n_merchants=1,
            customers_per_merchant=customers,
            n_products=400,
            events_per_merchant=4000,
            seed=seed,
        )
    )
    merchant_id = str(events["merchant_id"].iloc[0])
    home = root / merchant_id
    home.mkdir(parents=True)
    events = events[list(REQUIRED_COLUMNS)]
    write_events(events, home / "events.parquet")
    registry, public = platform_registry(root / "platform" / "registry", keys=root / "platform")
    merchant = MerchantConfig(
        id=merchant_id,
        data=home / "events.parquet",
        state_dir=home / "state",
        signing_key=home / "unused.key",
        inbox=home / "inbox",
        platform_key=public,
        serving=ServingConfig(reload_interval_s=0.05, min_customers_per_arm=20),
    )
    publisher = publisher_for(registry, root / "platform", SPEC)
    return World(root, merchant, events, registry, publisher)
