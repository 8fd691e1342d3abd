"""Privacy accounting for Poisson-subsampled Gaussian releases (DP-SGD).

A merchant's spend is a list of :class:`MechanismStep` (sigma, q, steps) read back from its
ledger; epsilon is recomputed from that list every time, so a restored history gives exactly
the epsilon of an uninterrupted one. Opacus' accountants do the maths here; auditors recompute
independently with Google's dp-accounting (``common.audit``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from common.errors import ConfigError


class PrivacyUnit(Enum):
    """Whose data one DP record protects (see docs/privacy.md)."""

    EVENT = "event"
    CUSTOMER = "customer"


class AccountantKind(Enum):
    """Which accountant turns a history into epsilon. RDP is the conservative default."""

    RDP = "rdp"
    PRV = "prv"


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


def validate_delta(delta: float) -> float:
    if not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def epsilon_spent(
    history: Sequence[MechanismStep],
    *,
    delta: float,
    accountant: AccountantKind = AccountantKind.RDP,
) -> float:
    """Cumulative epsilon of ``history`` at ``delta``; 0 for an empty history, inf without noise."""
    validate_delta(delta)
    if not history:
        return 0.0
    if any(step.noise_multiplier == 0 for step in history):
        return math.inf
    engine = RDPAccountant() if accountant is AccountantKind.RDP else PRVAccountant()
    engine.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history]
    return float(engine.get_epsilon(delta=delta))


def noise_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[MechanismStep] = (),
) -> float:
    """The smallest noise multiplier (RDP accounting) so that ``prior`` plus ``steps`` new
    steps at ``sample_rate`` stay within ``target_epsilon``."""
    validate_delta(delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    MechanismStep(1.0, sample_rate, steps)  # validates q and steps
    if not prior:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=0.005,
            )
        )
    low, high = 0.05, 100.0

    def eps_at(sigma: float) -> float:
        return epsilon_spent([*prior, MechanismStep(sigma, sample_rate, steps)], delta=delta)

    if eps_at(high) > target_epsilon:
        raise ConfigError(
            f"target_epsilon {target_epsilon} is already used up by earlier releases"
        )
    for _ in range(60):
        mid = (low + high) / 2
        if eps_at(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
