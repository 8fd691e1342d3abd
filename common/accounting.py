"""Privacy accounting for Poisson-subsampled Gaussian releases (DP-SGD).

A merchant's spend is a list of :class:`MechanismStep` (sigma, q, steps) read back from its
ledger; epsilon is recomputed from that list every time, so a restored history gives exactly
the epsilon of an uninterrupted one.

Two accountants: PLD (privacy loss distributions, Google's dp-accounting; the default) is tight,
about 10-15 % below RDP for the same noise, so a merchant reaches its cap with less noise. Its
discretisation is pessimistic (rounding only raises epsilon), so a finer recomputation by an
auditor never exceeds the recorded value. RDP (Opacus' analysis) is kept beside it in every
release as a second, looser bound.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from common.errors import ConfigError


class PrivacyUnit(Enum):
    """Whose data one DP record protects (see docs/privacy.md)."""

    EVENT = "event"
    CUSTOMER = "customer"


class AccountantKind(Enum):
    """Which accountant turns a history into epsilon (calibration and caps use the chosen one)."""

    PLD = "pld"
    RDP = "rdp"


PLD_DISCRETIZATION = 1e-3  # epsilon grid of the PLD; pessimistic: within ~1e-3 above exact


@dataclass(frozen=True)
class MechanismStep:
    """``steps`` applications of the Poisson-subsampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not (0 < self.sample_rate <= 1):
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps!r}")


# RDP orders: Opacus' default list plus large orders, which give tighter bounds at large sigma.
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
    80,
    96,
    128,
    192,
    256,
    512,
)


@functools.lru_cache(maxsize=4096)
def _unit_rdp(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one step at every order; RDP composes by addition, so n steps = n x this."""
    from opacus.accountants.analysis.rdp import compute_rdp

    values = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    return tuple(float(v) for v in values)


def _rdp_epsilon(history: Sequence[MechanismStep], delta: float) -> float:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = np.zeros(len(RDP_ORDERS))
    for step in history:
        total += step.steps * np.asarray(_unit_rdp(step.sample_rate, step.noise_multiplier))
    epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    return float(epsilon)


# Below this noise multiplier fedshop reports epsilon as unbounded instead of computing it: every
# accountant gives tens to thousands there (sigma 0.1, q 0.01, 100 steps: about 350), the PLD
# accountant needs minutes (sigma 0.01) or refuses the size of the grid (smaller still), and a
# request for such noise is refused when the configuration is read.
MIN_NOISE_MULTIPLIER = 0.3

# Above this, a cap on epsilon no longer limits what a release reveals; a non-private baseline
# is ``privacy.enabled = false``, which the ledger records as such.
MAX_EPSILON_CAP = 100.0


def unbounded(history: Sequence[MechanismStep]) -> bool:
    """A step with less noise than ``MIN_NOISE_MULTIPLIER`` (or none): epsilon counts as
    infinite, a true bound found without accounting. The one rule for the merchant, the
    platform and the auditor's independent recomputation."""
    return any(step.noise_multiplier < MIN_NOISE_MULTIPLIER for step in history)


def validate_delta(delta: float) -> float:
    if not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def merged(history: Sequence[MechanismStep]) -> tuple[MechanismStep, ...]:
    """Adjacent steps with the same (sigma, q) as one: composition is the same, PLD is faster."""
    out: list[MechanismStep] = []
    for step in history:
        last = out[-1] if out else None
        if last and (last.noise_multiplier, last.sample_rate) == (
            step.noise_multiplier,
            step.sample_rate,
        ):
            out[-1] = MechanismStep(
                last.noise_multiplier, last.sample_rate, last.steps + step.steps
            )
        else:
            out.append(step)
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(history: tuple[MechanismStep, ...], delta: float) -> float:
    import dp_accounting  # heavy: import on use
    from dp_accounting import pld

    accountant = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(
                        s.sample_rate, dp_accounting.GaussianDpEvent(s.noise_multiplier)
                    ),
                    s.steps,
                )
                for s in history
            ]
        )
    )
    return float(accountant.get_epsilon(delta))


def epsilon_spent(
    history: Sequence[MechanismStep],
    *,
    delta: float,
    accountant: AccountantKind = AccountantKind.PLD,
) -> float:
    """Cumulative epsilon of ``history`` at ``delta``; 0 for an empty history, inf when a step
    has no noise or less than ``MIN_NOISE_MULTIPLIER`` (an upper bound, so still true)."""
    validate_delta(delta)
    if not history:
        return 0.0
    if unbounded(history):
        return math.inf
    if accountant is AccountantKind.RDP:
        return _rdp_epsilon(history, delta)
    return _pld_epsilon(merged(history), float(delta))


def noise_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[MechanismStep] = (),
    max_noise_multiplier: float = 50.0,
    accountant: AccountantKind = AccountantKind.PLD,
) -> float:
    """The smallest noise multiplier (within 0.5 %, by ``accountant``) so that ``prior`` plus
    ``steps`` new steps at ``sample_rate`` stay within ``target_epsilon``.

    Raises ConfigError when even ``max_noise_multiplier`` would pass the target: the remaining
    budget is too small for a round worth running.
    """
    validate_delta(delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    MechanismStep(1.0, sample_rate, steps)  # validates q and steps
    return _calibrate(
        float(target_epsilon),
        float(delta),
        float(sample_rate),
        int(steps),
        tuple(prior),
        float(max_noise_multiplier),
        accountant,
    )


@functools.lru_cache(maxsize=256)
def _calibrate(
    target: float,
    delta: float,
    q: float,
    steps: int,
    prior: tuple[MechanismStep, ...],
    max_sigma: float,
    accountant: AccountantKind,
) -> float:
    def eps_at(sigma: float) -> float:
        return epsilon_spent(
            [*prior, MechanismStep(sigma, q, steps)], delta=delta, accountant=accountant
        )

    spent = epsilon_spent(prior, delta=delta, accountant=accountant)
    if eps_at(max_sigma) > target:
        raise ConfigError(
            f"the budget is used up: epsilon {spent:.3f} already spent of {target:g}, and even "
            f"noise multiplier {max_sigma:g} would pass the cap"
        )
    low, high = MIN_NOISE_MULTIPLIER, max_sigma
    while high / low > 1.005:
        mid = math.sqrt(low * high)
        if eps_at(mid) > target:
            low = mid
        else:
            high = mid
    return high
