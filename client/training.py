"""Settings and results of one merchant's local DP-SGD round, and its accounting helpers.

The trainer itself is :func:`client.nextbasket_training.train_scorer` (Poisson sampling,
per-record clipping in one backward pass, Gaussian noise from an explicit generator). What it plans
and reports lives here: the mechanism (:class:`DPSettings`), the optimisation
(:class:`LocalTraining`), the sample rate and step count Opacus will use
(:func:`steps_per_round`), the noised step for an empty Poisson batch (:func:`noise_only_step`)
and the released result (:class:`RoundResult`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from common.accounting import MechanismStep
from common.config import OptimizerKind
from common.errors import ConfigError


@dataclass(frozen=True)
class DPSettings:
    """The mechanism of one round. ``noise_multiplier`` 0 is allowed only for audits' controls."""

    noise_multiplier: float
    clipping_norm: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not (self.clipping_norm > 0 and math.isfinite(self.clipping_norm)):
            raise ConfigError(f"clipping_norm must be > 0, got {self.clipping_norm!r}")


@dataclass(frozen=True)
class LocalTraining:
    """Optimisation settings of one local round."""

    batch_size: int = 512
    local_epochs: int = 1
    learning_rate: float = 3e-3
    proximal_mu: float = 0.0
    optimizer: OptimizerKind = OptimizerKind.ADAM
    momentum: float = 0.9
    adam_epsilon: float = 1e-8

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.local_epochs < 1:
            raise ConfigError("batch_size and local_epochs must be >= 1")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu!r}")


@dataclass(frozen=True)
class RoundResult:
    arrays: dict[str, np.ndarray]
    num_records: int
    mean_loss: float
    mechanism: MechanismStep | None  # None for non-private training
    seconds: float


def steps_per_round(num_records: int, settings: LocalTraining) -> tuple[float, int]:
    """(sample rate q, steps) exactly as Opacus will use them: q = 1/len(loader)."""
    batches = math.ceil(num_records / settings.batch_size)
    return 1.0 / batches, batches * settings.local_epochs


def noise_only_step(
    optimizer: torch.optim.Optimizer, dp: DPSettings, generator: torch.Generator
) -> None:
    """An empty Poisson batch still takes a noised step: skipping it would reveal the emptiness."""
    inner = getattr(optimizer, "original_optimizer", optimizer)
    expected = getattr(optimizer, "expected_batch_size", 1) or 1
    for group in inner.param_groups:
        for param in group["params"]:
            noise = torch.normal(
                0.0,
                dp.noise_multiplier * dp.clipping_norm,
                param.shape,
                generator=generator,
                device=param.device,
            )
            param.grad = noise / expected
    inner.step()
    inner.zero_grad(set_to_none=True)
