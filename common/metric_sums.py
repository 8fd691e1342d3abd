"""Evaluation results as sums and counts: what a merchant's evaluation reply may carry.

A merchant scores a model on its own held-out customers and sends, per metric, the sum of the
per-case values, the sum of their squares and the number of cases, nothing per customer. Sums
add up across merchants, so the platform's overall figure is the case-weighted mean, and the
squares give a standard error for a normal-approximation confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from common.errors import IntegrityError

_FIELDS = ("sum", "sumsq", "count")


@dataclass(frozen=True)
class MetricSum:
    total: float = 0.0
    squares: float = 0.0
    count: float = 0.0  # float: a merchant may add noise to it (see client/evaluation)

    def __add__(self, other: MetricSum) -> MetricSum:
        return MetricSum(
            self.total + other.total, self.squares + other.squares, self.count + other.count
        )

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count >= 1 else math.nan

    def ci95(self) -> tuple[float, float]:
        """Normal-approximation 95 % interval of the mean (nan with fewer than 2 cases)."""
        if self.count < 2:
            return (math.nan, math.nan)
        variance = max(self.squares / self.count - self.mean**2, 0.0)
        half = 1.96 * math.sqrt(variance / (self.count - 1))
        return (self.mean - half, self.mean + half)


@dataclass(frozen=True)
class MetricSums:
    """Per-metric sums over a set of evaluation cases."""

    metrics: Mapping[str, MetricSum] = field(default_factory=dict)

    @classmethod
    def of(cls, values: Mapping[str, Iterable[float]]) -> MetricSums:
        """Sums of per-case values; NaN cases (metric undefined for that case) are left out."""
        out = {}
        for name, per_case in values.items():
            array = np.asarray(list(per_case), dtype=np.float64)
            array = array[np.isfinite(array)]
            out[name] = MetricSum(float(array.sum()), float((array**2).sum()), float(array.size))
        return cls(out)

    def __add__(self, other: MetricSums) -> MetricSums:
        names = set(self.metrics) | set(other.metrics)
        return MetricSums(
            {n: self.metrics.get(n, MetricSum()) + other.metrics.get(n, MetricSum()) for n in names}
        )

    def means(self) -> dict[str, float]:
        return {name: value.mean for name, value in sorted(self.metrics.items())}

    @property
    def cases(self) -> float:
        """The largest count over metrics (metrics that skip some cases count fewer)."""
        return max((v.count for v in self.metrics.values()), default=0.0)

    def to_flat(self, prefix: str) -> dict[str, float]:
        flat = {}
        for name, value in self.metrics.items():
            flat[f"{prefix}|{name}|sum"] = value.total
            flat[f"{prefix}|{name}|sumsq"] = value.squares
            flat[f"{prefix}|{name}|count"] = value.count
        return flat

    @classmethod
    def from_flat(cls, prefix: str, flat: Mapping[str, float]) -> MetricSums:
        """Inverse of :meth:`to_flat`; IntegrityError on a missing or non-finite part."""
        names = {
            key[len(prefix) + 1 :].rsplit("|", 1)[0] for key in flat if key.startswith(prefix + "|")
        }
        out = {}
        for name in names:
            try:
                parts = [float(flat[f"{prefix}|{name}|{f}"]) for f in _FIELDS]
            except KeyError as exc:
                raise IntegrityError(f"evaluation reply lacks {exc.args[0]!r}") from None
            if not all(math.isfinite(p) for p in parts):
                raise IntegrityError(f"evaluation reply has a non-finite value for {name!r}")
            out[name] = MetricSum(*parts)
        return cls(out)


def combine(parts: Iterable[MetricSums]) -> MetricSums:
    total = MetricSums()
    for part in parts:
        total = total + part
    return total
