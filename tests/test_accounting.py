"""Epsilon checked against independent implementations: RDP (Opacus' analysis) against
dp-accounting's RDP, PLD (dp-accounting) against Opacus' PRV accountant."""

import math

import pytest
from dp_accounting import dp_event, rdp

from common.accounting import (
    MAX_EPSILON_CAP,
    MIN_NOISE_MULTIPLIER,
    AccountantKind,
    MechanismStep,
    epsilon_spent,
    noise_for_target,
)
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
    ours = epsilon_spent(history, delta=1e-5, accountant=AccountantKind.RDP)
    assert ours == pytest.approx(reference_rdp(history, 1e-5), abs=0.01)


def test_composition_is_order_free_and_restorable():
    rounds = [MechanismStep(1.1, 0.04, 25) for _ in range(4)]
    merged = [MechanismStep(1.1, 0.04, 100)]
    assert epsilon_spent(rounds, delta=1e-6) == pytest.approx(epsilon_spent(merged, delta=1e-6))


def reference_prv(history, delta):
    from opacus.accountants import PRVAccountant

    engine = PRVAccountant()
    engine.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history]
    return engine.get_epsilon(delta=delta)


@pytest.mark.parametrize(
    "history",
    [
        [MechanismStep(1.0, 0.0256, 390)],
        [MechanismStep(0.8, 0.05, 20), MechanismStep(1.5, 0.01, 100)],
    ],
)
def test_pld_matches_opacus_prv_and_is_tighter_than_rdp(history):
    pld = epsilon_spent(history, delta=1e-5)  # PLD is the default
    assert pld == pytest.approx(reference_prv(history, 1e-5), abs=0.03)
    assert pld < epsilon_spent(history, delta=1e-5, accountant=AccountantKind.RDP)


def test_pld_discretisation_is_pessimistic():
    """A finer PLD grid (what an auditor may use) never gives more than the recorded value."""
    import dp_accounting
    from dp_accounting import pld

    step = MechanismStep(1.0, 0.0256, 390)
    fine = pld.PLDAccountant(value_discretization_interval=1e-5)
    fine.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.0256, dp_accounting.GaussianDpEvent(1.0)), 390
        )
    )
    recorded = epsilon_spent([step], delta=1e-5)
    assert fine.get_epsilon(1e-5) <= recorded <= fine.get_epsilon(1e-5) + 0.005
    assert recorded == pytest.approx(3.21, abs=0.01)  # PLATFORM_NOTES: PLD 3.21, RDP 3.63


def test_empty_and_noiseless():
    assert epsilon_spent([], delta=1e-5) == 0.0
    assert math.isinf(epsilon_spent([MechanismStep(0.0, 0.1, 1)], delta=1e-5))


@pytest.mark.parametrize("accountant", list(AccountantKind))
@pytest.mark.parametrize("sigma", [1e-9, 0.01, MIN_NOISE_MULTIPLIER * 0.99])
def test_noise_below_the_floor_is_unbounded_at_once(accountant, sigma):
    """A ledger entry with almost no noise (sigma 1e-9 made the PLD grid too large to build,
    0.01 took minutes) is reported as unbounded: a true upper bound, found without accounting."""
    history = [MechanismStep(1.0, 0.01, 10), MechanismStep(sigma, 0.01, 100)]
    assert math.isinf(epsilon_spent(history, delta=1e-5, accountant=accountant))


def test_at_the_floor_epsilon_is_finite_and_large():
    epsilon = epsilon_spent([MechanismStep(MIN_NOISE_MULTIPLIER, 0.01, 100)], delta=1e-5)
    assert 10 < epsilon < math.inf  # no useful guarantee is lost below the floor


def test_calibration_for_a_loose_target_stays_at_or_above_the_floor():
    sigma = noise_for_target(target_epsilon=MAX_EPSILON_CAP, delta=1e-5, sample_rate=0.5, steps=1)
    assert sigma >= MIN_NOISE_MULTIPLIER
    reached = epsilon_spent([MechanismStep(sigma, 0.5, 1)], delta=1e-5)
    assert reached <= MAX_EPSILON_CAP


@pytest.mark.parametrize("accountant", list(AccountantKind))
def test_noise_for_target_meets_target_with_prior(accountant):
    prior = [MechanismStep(1.0, 0.05, 40)]
    sigma = noise_for_target(
        target_epsilon=3.0,
        delta=1e-5,
        sample_rate=0.05,
        steps=60,
        prior=prior,
        accountant=accountant,
    )
    reached = epsilon_spent(
        [*prior, MechanismStep(sigma, 0.05, 60)], delta=1e-5, accountant=accountant
    )
    assert reached <= 3.0 + 1e-6
    assert reached > 2.9  # not wastefully noisy


def test_pld_calibration_needs_less_noise_than_rdp():
    kwargs = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.02, steps=250)
    pld_sigma = noise_for_target(**kwargs)
    rdp_sigma = noise_for_target(**kwargs, accountant=AccountantKind.RDP)
    assert pld_sigma < 0.95 * rdp_sigma


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
