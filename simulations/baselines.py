"""Non-federated reference points, trained and scored exactly like the federation.

Same encoding, same model, same DP trainer, same evaluation cases; only who trains on what
differs: all merchants pooled (centralized), each merchant alone (local-only), or no training
at all (most-popular).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from server.evaluation_set import EvaluationSet

from client.training import DPSettings, LocalTraining, steps_per_round, train_round
from common.accounting import PrivacyUnit, noise_for_target
from common.config import RunConfig
from common.evaluation import model_scores
from common.events import read_events
from common.features import (
    RecordTensors,
    build_catalog,
    encode_events,
    stable_hash,
    training_records,
)
from common.model import Recommender
from common.rng import numpy_stream, torch_stream
from simulations.provision import RunLayout


@dataclass(frozen=True)
class MethodResult:
    method: str
    overall: dict[str, float]
    per_merchant: dict[str, dict[str, float]]
    seconds: float
    epsilon: float | None  # None: not private


def merchant_events(layout: RunLayout) -> dict[str, pd.DataFrame]:
    return {m: read_events(layout.merchants / m / "events.parquet") for m in layout.merchant_ids()}


def popularity(layout: RunLayout, test: EvaluationSet, config: RunConfig) -> MethodResult:
    began = time.perf_counter()
    scores = np.zeros(test.records.items.shape[::2], dtype=np.float64)
    for index, (merchant, events) in enumerate(sorted(merchant_events(layout).items())):
        hashed = stable_hash(events["product_id"], config.model.product_buckets)
        counts = np.bincount(hashed, minlength=config.model.product_buckets)
        rows = test.merchant_index == test.merchants.index(merchant)
        scores[rows] = counts[test.records.items[rows, 0, :].numpy()]
        del index
    overall, per = test.metrics_of(scores)
    return MethodResult("most-popular", overall, per, time.perf_counter() - began, None)


def _records(config: RunConfig, events: pd.DataFrame, rng: np.random.Generator) -> RecordTensors:
    encoded = encode_events(events, config.model)
    catalog = build_catalog(events, config.model)
    return training_records(
        encoded,
        catalog,
        unit=PrivacyUnit.EVENT,
        negatives=config.training.negatives,
        events_per_customer=config.training.events_per_customer,
        rng=rng,
    )


def _concat(parts: list[RecordTensors]) -> RecordTensors:
    return RecordTensors(*[torch.cat([p.tensors()[i] for p in parts]) for i in range(5)])


def train_alone(
    config: RunConfig, records: RecordTensors, *, epsilon: float | None, stream: tuple[str, ...]
) -> tuple[Recommender, float | None]:
    """Train for as many epochs as the federation's rounds x local epochs, with DP at
    ``epsilon`` (calibrated over all steps) or without DP."""
    torch.manual_seed(0)
    model = Recommender(config.model)
    epochs = config.federation.rounds * config.training.local_epochs
    settings = LocalTraining(
        batch_size=config.training.batch_size,
        local_epochs=epochs,
        learning_rate=config.training.step_size,
        optimizer=config.training.optimizer,
        momentum=config.training.momentum,
    )
    dp = None
    if epsilon is not None:
        q, steps = steps_per_round(len(records), settings)
        delta = min(config.privacy.delta, 1.0 / (10 * len(records)))
        sigma = noise_for_target(target_epsilon=epsilon, delta=delta, sample_rate=q, steps=steps)
        dp = DPSettings(noise_multiplier=sigma, clipping_norm=config.privacy.clipping_norm)
    train_round(
        model=model,
        records=records,
        settings=settings,
        dp=dp,
        sampling_generator=torch_stream(config.seed, *stream, "sampling"),
        noise_generator=torch_stream(config.seed, *stream, "noise"),
    )
    return model, epsilon


def centralized(
    layout: RunLayout, test: EvaluationSet, config: RunConfig, *, epsilon: float | None
) -> MethodResult:
    began = time.perf_counter()
    events = merchant_events(layout)
    parts = [
        _records(config, e, numpy_stream(config.seed, "central", m))
        for m, e in sorted(events.items())
    ]
    model, eps = train_alone(config, _concat(parts), epsilon=epsilon, stream=("central",))
    overall, per = test.evaluate(model)
    name = "centralized " + ("non-private" if epsilon is None else f"DP (eps {epsilon:g})")
    return MethodResult(name, overall, per, time.perf_counter() - began, eps)


def local_only(
    layout: RunLayout, test: EvaluationSet, config: RunConfig, *, epsilon: float
) -> MethodResult:
    began = time.perf_counter()
    scores = np.zeros(test.records.items.shape[::2], dtype=np.float64)
    for merchant, events in sorted(merchant_events(layout).items()):
        records = _records(config, events, numpy_stream(config.seed, "local", merchant))
        model, _ = train_alone(config, records, epsilon=epsilon, stream=("local", merchant))
        rows = np.flatnonzero(test.merchant_index == test.merchants.index(merchant))
        subset = RecordTensors(*[t[torch.from_numpy(rows)] for t in test.records.tensors()])
        scores[rows] = model_scores(model, subset)
    overall, per = test.metrics_of(scores)
    return MethodResult(
        f"local-only DP (eps {epsilon:g})", overall, per, time.perf_counter() - began, epsilon
    )


def load_test_set(layout: RunLayout) -> EvaluationSet:
    return EvaluationSet.load(Path(layout.server / "eval-test.npz"))
