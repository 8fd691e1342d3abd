"""Server-side aggregation: FedAvg, FedProx and FedAdam over named float32 arrays.

Merchants' updates arrive as float32 or float16 arrays (``federation.update_dtype``); both
are folded in exactly (a float16 is a float32 with fewer bits) and the aggregate is float32.

Each strategy exposes its state as named arrays so a checkpoint captures it exactly and a
resumed run continues bit for bit. Updates are folded into an exact running sum as replies
arrive (:class:`RunningSum`): the platform never holds every merchant's arrays at once, and
the result does not depend on the order replies arrived in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


@dataclass(frozen=True)
class Contribution:
    """Who went into an aggregate, and with what weight (the arrays are already folded in)."""

    merchant_id: str
    num_examples: int


# The exact sum keeps each weighted value w * x (a float32 or float16 times an integer weight
# below 2**29, so exact in float64) as six signed 40-bit digits of a fixed-point number with
# its lowest digit at 2**-160: every float32 (down to 2**-149; float16 only to 2**-24) times an
# integer fits, sums are integer sums, and int64 digits carry 2**23 additions before they
# could overflow.
_DIGIT_BITS = 40
_LOWEST = -160
_DIGITS = 6
_TOP = float(2.0 ** (_LOWEST + _DIGIT_BITS * _DIGITS - 1))
_MAX_WEIGHT = 1 << 29
_MAX_FOLDS = 1 << 23


class RunningSum:
    """The weighted sum of the updates folded in so far, and who contributed.

    Memory is one fixed-size accumulator per array whatever the number of merchants: a reply's
    arrays can be dropped as soon as they are folded in. The sum is exact (integer digits, see
    above), so the mean is the same bit for bit whatever order the replies arrived in, and equals
    the exact weighted mean rounded to float32 (up to the last bit of a float64 division).
    """

    def __init__(self) -> None:
        self._digits: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.contributors: list[Contribution] = []
        self.total = 0

    def add(self, update: MerchantUpdate) -> None:
        """Fold ``update`` in; it must have the names and shapes of the earlier ones."""
        weight = update.num_examples
        if not 0 < weight < _MAX_WEIGHT:
            raise TrainingError(
                f"{update.merchant_id}: update weight {weight} is outside 1..{_MAX_WEIGHT - 1}"
            )
        if len(self.contributors) >= _MAX_FOLDS:
            raise TrainingError(f"more than {_MAX_FOLDS} updates in one aggregate")
        if self._digits and set(update.arrays) != set(self._digits):
            raise TrainingError(f"{update.merchant_id}: update arrays differ from the others'")
        for name, values in update.arrays.items():
            if name in self._shapes and values.shape != self._shapes[name]:
                raise TrainingError(f"{update.merchant_id}: {name} has shape {values.shape}")
        for name, values in update.arrays.items():
            products = values.astype(np.float64).ravel() * float(weight)
            digits = self._digits.setdefault(name, np.zeros((_DIGITS, products.size), np.int64))
            self._shapes.setdefault(name, values.shape)
            _fold(digits, products)
        self.contributors.append(Contribution(update.merchant_id, weight))
        self.total += weight

    append = add  # a RunningSum stands where a list of updates used to

    def __len__(self) -> int:
        return len(self.contributors)

    def __iter__(self) -> Iterator[Contribution]:
        return iter(sorted(self.contributors, key=lambda c: c.merchant_id))

    def mean(self) -> Arrays:
        """The weighted mean as float32 arrays."""
        if self.total <= 0:
            raise TrainingError("cannot aggregate updates with no examples")
        total = float(self.total)
        return {
            name: (_value(digits) / total).astype(np.float32).reshape(self._shapes[name])
            for name, digits in self._digits.items()
        }


def _fold(digits: np.ndarray, products: np.ndarray) -> None:
    """Add the exact float64 ``products`` into the fixed-point ``digits`` (every step exact:
    scaling by a power of two, flooring, and taking off the digit's part of a magnitude)."""
    magnitude = np.abs(products)
    largest = float(magnitude.max()) if magnitude.size else 0.0
    if largest >= _TOP:
        raise TrainingError(f"a weighted update value exceeds {_TOP:g}: cannot aggregate")
    negative = products < 0
    digit = np.empty_like(magnitude)
    for k in range(_DIGITS - 1, -1, -1):
        scale = 2.0 ** (_LOWEST + _DIGIT_BITS * k)
        if largest < scale:  # this digit is zero everywhere
            continue
        np.multiply(magnitude, 1.0 / scale, out=digit)
        np.floor(digit, out=digit)
        magnitude -= digit * scale
        whole = digit.astype(np.int64)
        np.negative(whole, out=whole, where=negative)
        digits[k] += whole
        largest = float(magnitude.max())
        if largest == 0.0:  # nothing left below
            break


def _value(digits: np.ndarray) -> np.ndarray:
    """The float64 nearest (to within an ulp) the fixed-point number: carries are propagated
    first, so each digit is small and the sum from the top down rounds at most twice."""
    carried = digits.copy()
    base = np.int64(1 << _DIGIT_BITS)
    for k in range(_DIGITS - 1):
        carry = np.floor_divide(carried[k], base)
        carried[k] -= carry * base
        carried[k + 1] += carry
    total = np.zeros(carried.shape[1], np.float64)
    for k in range(_DIGITS - 1, -1, -1):
        total += carried[k].astype(np.float64) * 2.0 ** (_LOWEST + _DIGIT_BITS * k)
    return total


Updates = Iterable[MerchantUpdate] | RunningSum


def running_sum(updates: Updates) -> RunningSum:
    if isinstance(updates, RunningSum):
        return updates
    folded = RunningSum()
    for update in updates:
        folded.add(update)
    return folded


def weighted_average(updates: Updates) -> Arrays:
    """The weighted mean of ``updates`` (a list, or a sum folded as replies arrived)."""
    return running_sum(updates).mean()


class FedAvg:
    """Weighted mean of the merchants' models (weights = training records)."""

    def aggregate(self, current: Arrays, updates: Updates) -> Arrays:
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

    def aggregate(self, current: Arrays, updates: Updates) -> Arrays:
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
