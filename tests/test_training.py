"""DP training: the plumbing with noise off, the noise with seeded generators."""

import numpy as np
import pytest
import torch

from client.training import (
    DPSettings,
    GroupedSoftmaxLoss,
    LocalTraining,
    steps_per_round,
    train_round,
)
from common.features import RecordTensors
from common.model import ModelSpec, Recommender, arrays_sha256

SPEC = ModelSpec(
    product_buckets=512,
    category_buckets=16,
    department_buckets=4,
    embedding_dim=8,
    hidden_dim=8,
    history_length=4,
)


def records(n=600, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 64, (n, groups, 5), generator=g)
    history = items[:, :, :1].repeat(1, 1, 4)  # the positive was bought before: learnable
    return RecordTensors(
        history, items, torch.ones_like(items), torch.ones_like(items), torch.ones(n, groups)
    )


DEFAULT = LocalTraining(batch_size=64, local_epochs=2, learning_rate=0.02)


def run(dp, seed=0, settings=DEFAULT):
    torch.manual_seed(0)
    model = Recommender(SPEC)
    return train_round(
        model=model,
        records=records(),
        settings=settings,
        dp=dp,
        sampling_generator=torch.Generator().manual_seed(seed),
        noise_generator=torch.Generator().manual_seed(seed + 1),
    )


def test_same_seeds_same_weights_different_seeds_differ():
    dp = DPSettings(noise_multiplier=1.0, clipping_norm=1.0)
    a, b, c = run(dp), run(dp), run(dp, seed=5)
    assert arrays_sha256(a.arrays) == arrays_sha256(b.arrays)
    assert arrays_sha256(a.arrays) != arrays_sha256(c.arrays)


def test_mechanism_reported_as_opacus_used_it():
    result = run(DPSettings(noise_multiplier=1.3, clipping_norm=0.5))
    q, steps = steps_per_round(600, LocalTraining(batch_size=64, local_epochs=2))
    assert result.mechanism is not None
    assert result.mechanism.sample_rate == pytest.approx(q) == pytest.approx(1 / 10)
    assert result.mechanism.steps == steps == 20 and result.mechanism.noise_multiplier == 1.3


def test_learns_with_low_noise_and_noise_hurts():
    """Same seeds, data and clipping; only sigma differs, so the loss gap is the noise's doing.
    Measured (seeds 0-2): sigma 0 or 0.01 -> 0.87-0.90, sigma 4 -> 1.24-1.32, chance log 5
    = 1.61; without noise the two runs would agree to within about 0.03."""
    quiet = run(DPSettings(noise_multiplier=0.01, clipping_norm=5.0))
    loud = run(DPSettings(noise_multiplier=4.0, clipping_norm=5.0))
    plain = run(None)
    assert plain.mechanism is None
    chance = np.log(5)
    assert plain.mean_loss < 0.7 * chance and quiet.mean_loss < 0.7 * chance
    assert loud.mean_loss > quiet.mean_loss + 0.2


def test_dp_noise_reaches_untouched_embedding_rows():
    """Rows no record uses stay put without DP; DP noise is dense and moves them."""
    settings = LocalTraining(batch_size=600, local_epochs=1, learning_rate=1e-3)
    base = run(None, settings=settings).arrays
    loud = run(DPSettings(noise_multiplier=50.0, clipping_norm=1.0), settings=settings).arrays
    # Adam normalises steps: with overwhelming noise nearly every coordinate moves by ~lr.
    moved = np.abs(loud["items.weight"] - base["items.weight"])
    assert np.median(moved) > 5e-4


def test_grouped_loss_per_record():
    loss = GroupedSoftmaxLoss()
    logits = torch.zeros(2, 3, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss.reduction = "none"
    per = loss(logits, mask)
    assert per.shape == (2,) and torch.allclose(
        per, torch.full((2,), np.log(4), dtype=torch.float32)
    )
