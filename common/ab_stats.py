"""Statistics of an A/B test from aggregate counts only: what may leave a merchant.

A metric is a ratio of per-customer sums ``sum(Y)/sum(X)`` (the customer is the unit: arms are
assigned per customer). Its sufficient statistics :class:`RatioSums` (``n, sum X, sum Y,
sum X^2, sum Y^2, sum XY``) add up across merchants, and from them alone come the estimate, the
delta method's standard error ``sqrt(n/(n-1) * sum((Y_c - R X_c)^2)) / sum(X)``, a 95% interval,
and a two-sided z test of candidate minus control. A merchant's report (client/serving) and the
platform's pooled view of several merchants (server/ab_evidence.py) are the same computation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from common.errors import IntegrityError

Z95 = 1.959963984540054
Z80_POWER = 0.8416212335729143
METRICS = ("hit_rate", "ndcg@10", "revenue_hit_rate")
ARMS = ("control", "candidate")
MIN_HITS = 10  # per arm, for the normal approximation to be trusted


@dataclass(frozen=True)
class RatioSums:
    """Sufficient statistics of a ratio of per-customer sums (they add across merchants)."""

    n: int = 0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    yy: float = 0.0
    xy: float = 0.0

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> RatioSums:
        return cls(
            len(x),
            float(x.sum()),
            float(y.sum()),
            float((x * x).sum()),
            float((y * y).sum()),
            float((x * y).sum()),
        )

    def __add__(self, other: RatioSums) -> RatioSums:
        return RatioSums(
            self.n + other.n,
            self.x + other.x,
            self.y + other.y,
            self.xx + other.xx,
            self.yy + other.yy,
            self.xy + other.xy,
        )

    def as_tuple(self) -> tuple[float, ...]:
        return (self.n, self.x, self.y, self.xx, self.yy, self.xy)

    def estimate(self) -> Estimate:
        if self.x <= 0:
            return Estimate(math.nan, math.nan, math.nan, math.nan)
        ratio = self.y / self.x
        if self.n < 2:
            return Estimate(ratio, math.nan, math.nan, math.nan)
        squares = max(0.0, self.yy - 2 * ratio * self.xy + ratio * ratio * self.xx)
        se = math.sqrt(self.n / (self.n - 1) * squares) / self.x
        return Estimate(ratio, se, ratio - Z95 * se, ratio + Z95 * se)


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """Candidate minus control on one metric."""

    metric: str
    difference: float
    low: float
    high: float
    p_value: float
    minimum_detectable: float  # smallest true difference found with 80% power at this size


def compare(metric: str, control: RatioSums, candidate: RatioSums) -> Comparison:
    a, b = control.estimate(), candidate.estimate()
    se = math.sqrt(a.se**2 + b.se**2)
    diff = b.value - a.value
    if not (math.isfinite(se) and se > 0):
        return Comparison(metric, diff, math.nan, math.nan, math.nan, math.nan)
    p = math.erfc(abs(diff / se) / math.sqrt(2.0))
    return Comparison(metric, diff, diff - Z95 * se, diff + Z95 * se, p, (Z95 + Z80_POWER) * se)


# The Flower message asking merchants for their evidence: ``@app.query(EVIDENCE_ACTION)``.
EVIDENCE_ACTION = "abevidence"
EVIDENCE_MESSAGE_TYPE = f"query.{EVIDENCE_ACTION}"
CANDIDATE_KEY = "candidate"  # config: the candidate version whose test is asked for
REPORTED = "reported"  # reply outcome; the reply's metrics hold :func:`to_flat` evidence
REFUSED = "refused"

Evidence = dict[str, dict[str, RatioSums]]  # arm -> metric -> sums
_FIELDS = ("n", "x", "y", "xx", "yy", "xy")


def sample_problems(evidence: Mapping[str, Mapping[str, RatioSums]], min_customers: int) -> str:
    """Why the sample is too small to conclude ("" when it is not)."""
    problems = []
    for arm in ARMS:
        hits = evidence.get(arm, {}).get("hit_rate", RatioSums())
        if hits.n < min_customers:
            problems.append(f"{arm} arm has {hits.n} customers (need >= {min_customers})")
        if hits.y < MIN_HITS:
            problems.append(f"{arm} arm has {int(hits.y)} hits (need >= {MIN_HITS})")
    return "; ".join(problems)


def to_flat(evidence: Mapping[str, Mapping[str, RatioSums]]) -> dict[str, float]:
    """``{"arm/metric/field": value}``: the numbers a merchant may send."""
    return {
        f"{arm}/{metric}/{name}": float(value)
        for arm, sums in evidence.items()
        for metric, s in sums.items()
        for name, value in zip(_FIELDS, s.as_tuple(), strict=True)
    }


def from_flat(values: Mapping[str, object], *, source: str) -> Evidence:
    """The inverse of :func:`to_flat`; anything else is refused."""
    parts: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in values.items():
        arm, metric, name = [*key.split("/"), "", "", ""][:3]
        number = float(value) if isinstance(value, int | float) else math.nan
        if (
            arm not in ARMS
            or metric not in METRICS
            or name not in _FIELDS
            or not math.isfinite(number)
        ):
            raise IntegrityError(f"{source}: unexpected evidence entry {key!r} = {value!r}")
        parts.setdefault((arm, metric), {})[name] = number
    evidence: Evidence = {}
    for (arm, metric), fields in parts.items():
        if set(fields) != set(_FIELDS) or fields["n"] < 0 or not fields["n"].is_integer():
            raise IntegrityError(f"{source}: incomplete or invalid sums for {arm}/{metric}")
        n = int(fields.pop("n"))
        evidence.setdefault(arm, {})[metric] = RatioSums(n, **fields)
    return evidence


def pool(evidences: Iterable[Mapping[str, Mapping[str, RatioSums]]]) -> Evidence:
    """Several merchants' evidence as one (customers of different merchants are different)."""
    pooled: Evidence = {arm: {metric: RatioSums() for metric in METRICS} for arm in ARMS}
    for evidence in evidences:
        for arm, sums in evidence.items():
            for metric, s in sums.items():
                pooled[arm][metric] = pooled[arm][metric] + s
    return pooled
