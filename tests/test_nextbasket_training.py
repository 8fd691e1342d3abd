"""DP training of the shared scorer (train_scorer): the plumbing with noise off, the noise with
seeded generators, and the mechanism reported as Opacus used it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.nextbasket_training import train_scorer
from client.training import DPSettings, LocalTraining, RoundResult, steps_per_round
from common.accounting import PrivacyUnit
from common.arrays_io import arrays_sha256
from common.nextbasket.baskets import basket_cases, basket_log
from common.nextbasket.features import history_features
from common.nextbasket.model import BasketScorer, RecordTensors
from common.nextbasket.records import item_ids, training_records
from common.nextbasket.spec import RecordSpec, ScorerSpec
from tests.test_nextbasket_model import shop_events

SPEC = ScorerSpec(product_buckets=512, category_buckets=16, department_buckets=8, hidden_dim=8)
DEFAULT = LocalTraining(batch_size=16, local_epochs=2, learning_rate=0.02)


@pytest.fixture(scope="module")
def records() -> RecordTensors:
    log = basket_log(shop_events(seed=1, customers=16))
    train = basket_cases(log, weeks=(1, 12), catalogue_weeks=(1, 12))
    arrays = training_records(
        train,
        history_features(log, train),
        item_ids(log, SPEC),
        unit=PrivacyUnit.EVENT,
        spec=RecordSpec(max_positives=4, history_negatives=4, uniform_negatives=4),
        rng=np.random.default_rng(0),
    )
    return RecordTensors.of(arrays)


def run(
    records: RecordTensors, dp: DPSettings | None, seed: int = 0, settings: LocalTraining = DEFAULT
) -> RoundResult:
    torch.manual_seed(0)
    return train_scorer(
        model=BasketScorer(SPEC),
        records=records,
        settings=settings,
        dp=dp,
        sampling_generator=torch.Generator().manual_seed(seed),
        noise_generator=torch.Generator().manual_seed(seed + 1),
    )


def test_same_seeds_same_weights_different_seeds_differ(records):
    dp = DPSettings(noise_multiplier=1.0, clipping_norm=1.0)
    a, b, c = run(records, dp), run(records, dp), run(records, dp, seed=5)
    assert arrays_sha256(a.arrays) == arrays_sha256(b.arrays)
    assert arrays_sha256(a.arrays) != arrays_sha256(c.arrays)


def test_mechanism_reported_as_opacus_used_it(records):
    result = run(records, DPSettings(noise_multiplier=1.3, clipping_norm=0.5))
    q, steps = steps_per_round(len(records), DEFAULT)
    batches = -(-len(records) // 16)
    assert result.mechanism is not None and result.num_records == len(records)
    assert result.mechanism.sample_rate == pytest.approx(q) == pytest.approx(1 / batches)
    assert result.mechanism.steps == steps == 2 * batches
    assert result.mechanism.noise_multiplier == 1.3
    assert run(records, None).mechanism is None


def test_dp_noise_reaches_product_rows_no_record_uses(records):
    """Rows no record uses stay put without DP; DP noise is dense and moves them (the canary
    audit's product biases rely on both)."""
    used = np.unique(records.items[..., 0].numpy())
    unused = np.setdiff1d(np.arange(SPEC.product_buckets), used)
    settings = LocalTraining(batch_size=len(records), local_epochs=1, learning_rate=1e-3)
    quiet = run(records, DPSettings(noise_multiplier=0.0, clipping_norm=1.0), settings=settings)
    loud = run(records, DPSettings(noise_multiplier=50.0, clipping_norm=1.0), settings=settings)
    assert len(unused) > 100
    assert (quiet.arrays["product_bias.weight"][unused] == 0).all()
    # Adam normalises steps: with overwhelming noise nearly every coordinate moves by ~lr.
    assert np.median(np.abs(loud.arrays["product_bias.weight"][unused])) > 5e-4


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=1.0, clipping_norm=1.0)])
def test_fedprox_keeps_the_released_weights_nearer_the_round_start(records, dp):
    """FedProx's proximal term really acts in the merchant round (with and without DP)."""
    from dataclasses import replace

    torch.manual_seed(0)
    start = {k: v.detach().numpy().copy() for k, v in BasketScorer(SPEC).state_dict().items()}

    def moved(result: RoundResult) -> float:
        return float(sum(np.sum((result.arrays[k] - start[k]) ** 2) for k in result.arrays))

    plain = moved(run(records, dp))
    pulled = moved(run(records, dp, settings=replace(DEFAULT, proximal_mu=5.0)))
    assert pulled < 0.8 * plain
