"""Server-side aggregation: FedAvg, FedProx and FedAdam over named float32 arrays.

Each strategy exposes its state as named arrays so a checkpoint captures it exactly and a
resumed run continues bit for bit. Updates are combined in merchant-id order, so the result
does not depend on the order replies arrived in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.config import FederationConfig, StrategyKind
from common.errors import CheckpointError, TrainingError

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class MerchantUpdate:
    merchant_id: str
    arrays: Arrays
    num_examples: int


def weighted_average(updates: Sequence[MerchantUpdate]) -> Arrays:
    ordered = sorted(updates, key=lambda u: u.merchant_id)
    total = float(sum(u.num_examples for u in ordered))
    if total <= 0:
        raise TrainingError("cannot aggregate updates with no examples")
    result: Arrays = {}
    for name in ordered[0].arrays:
        acc = np.zeros_like(ordered[0].arrays[name], dtype=np.float64)
        for update in ordered:
            acc += update.arrays[name].astype(np.float64) * (update.num_examples / total)
        result[name] = acc.astype(np.float32)
    return result


class FedAvg:
    """Weighted mean of the merchants' models (weights = training records)."""

    def aggregate(self, current: Arrays, updates: Sequence[MerchantUpdate]) -> Arrays:
        return weighted_average(updates)

    def state(self) -> Arrays:
        return {}

    def load_state(self, state: Arrays) -> None:
        if state:
            raise CheckpointError(
                f"the checkpoint holds server-optimiser state {sorted(state)[:3]}, but "
                "FedAvg has none: it was written by a run with another strategy"
            )


class FedProx(FedAvg):
    """FedAvg on the server; the proximal term lives in the merchants' local training."""


class FedAdam:
    """Adam on the server over the pseudo-gradient (Reddi et al., 2021)."""

    def __init__(
        self, *, learning_rate: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self.learning_rate, self.beta1, self.beta2, self.tau = learning_rate, beta1, beta2, tau
        self._m: Arrays = {}
        self._v: Arrays = {}

    def aggregate(self, current: Arrays, updates: Sequence[MerchantUpdate]) -> Arrays:
        mean = weighted_average(updates)
        result: Arrays = {}
        for name, weights in current.items():
            delta = mean[name].astype(np.float64) - weights
            m = self.beta1 * self._m.get(name, np.zeros_like(delta)) + (1 - self.beta1) * delta
            v = self.beta2 * self._v.get(name, np.zeros_like(delta)) + (1 - self.beta2) * delta**2
            self._m[name], self._v[name] = m.astype(np.float32), v.astype(np.float32)
            result[name] = (weights + self.learning_rate * m / (np.sqrt(v) + self.tau)).astype(
                np.float32
            )
        return result

    def state(self) -> Arrays:
        return {
            **{f"m/{k}": v for k, v in self._m.items()},
            **{f"v/{k}": v for k, v in self._v.items()},
        }

    def load_state(self, state: Arrays) -> None:
        self._m = {k[2:]: v for k, v in state.items() if k.startswith("m/")}
        self._v = {k[2:]: v for k, v in state.items() if k.startswith("v/")}


Strategy = FedAvg | FedAdam


def build_strategy(config: FederationConfig) -> Strategy:
    if config.strategy is StrategyKind.FEDADAM:
        return FedAdam(learning_rate=config.server_learning_rate)
    if config.strategy is StrategyKind.FEDPROX:
        return FedProx()
    return FedAvg()
