"""Epsilon from Opacus checked against Google's dp-accounting (an independent implementation)."""

import math

import pytest
from dp_accounting import dp_event, rdp

from common.accounting import AccountantKind, MechanismStep, epsilon_spent, noise_for_target
from common.errors import ConfigError


def reference_rdp(history, delta):
    accountant = rdp.RdpAccountant()
    for step in history:
        event = dp_event.PoissonSampledDpEvent(
            step.sample_rate, dp_event.GaussianDpEvent(step.noise_multiplier)
        )
        accountant.compose(dp_event.SelfComposedDpEvent(event, step.steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    "history",
    [
        [MechanismStep(1.0, 0.0256, 390)],
        [MechanismStep(0.8, 0.05, 20), MechanismStep(0.8, 0.05, 20), MechanismStep(1.5, 0.01, 100)],
    ],
)
def test_rdp_matches_dp_accounting(history):
    ours = epsilon_spent(history, delta=1e-5)
    assert ours == pytest.approx(reference_rdp(history, 1e-5), abs=0.01)


def test_composition_is_order_free_and_restorable():
    rounds = [MechanismStep(1.1, 0.04, 25) for _ in range(4)]
    merged = [MechanismStep(1.1, 0.04, 100)]
    assert epsilon_spent(rounds, delta=1e-6) == pytest.approx(epsilon_spent(merged, delta=1e-6))


def test_prv_tighter_than_rdp():
    history = [MechanismStep(1.0, 0.0256, 390)]
    prv = epsilon_spent(history, delta=1e-5, accountant=AccountantKind.PRV)
    assert prv < epsilon_spent(history, delta=1e-5)
    assert prv == pytest.approx(3.22, abs=0.05)


def test_empty_and_noiseless():
    assert epsilon_spent([], delta=1e-5) == 0.0
    assert math.isinf(epsilon_spent([MechanismStep(0.0, 0.1, 1)], delta=1e-5))


def test_noise_for_target_meets_target_with_prior():
    prior = [MechanismStep(1.0, 0.05, 40)]
    sigma = noise_for_target(
        target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=60, prior=prior
    )
    reached = epsilon_spent([*prior, MechanismStep(sigma, 0.05, 60)], delta=1e-5)
    assert reached <= 3.0 + 1e-6
    assert reached > 2.9  # not wastefully noisy


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise_multiplier=-1, sample_rate=0.1, steps=1),
        dict(noise_multiplier=1, sample_rate=0, steps=1),
        dict(noise_multiplier=1, sample_rate=1.5, steps=1),
        dict(noise_multiplier=1, sample_rate=0.1, steps=0),
    ],
)
def test_mechanism_validation_names_value(kwargs):
    with pytest.raises(ConfigError):
        MechanismStep(**kwargs)


def test_budget_used_up_is_reported():
    prior = [MechanismStep(0.5, 0.5, 500)]
    with pytest.raises(ConfigError, match="used up"):
        noise_for_target(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=10, prior=prior)
