"""Full-ranking next-basket metrics, their additive sums, and bootstrap intervals.

For each case the scorer ranks the merchant's whole catalogue. With ``B`` the products the
household bought in the case's basket (including products outside the catalogue, which no
ranking can reach) and ``L_K`` the top ``K`` of the ranking:

- ``recall@K`` = |L_K ∩ B| / |B|;
- ``ndcg@K`` = sum over hits of 1 / log2(rank + 2) (rank from 0), divided by the ideal
  sum over the first min(K, |B|) ranks.

The ``:repeat`` and ``:explore`` variants use the same ranking but count as relevant only the
basket's repeat items (bought before by the household) or only its explore items, with |B|
and the ideal sum taken over that part. A case whose part is empty (no repeat items, say)
has no value for that part and does not count in its mean; a case with an empty basket counts
in no mean at all.

Ties are broken against the scorer: among items with equal scores, every non-relevant item
ranks above every relevant one. A constant scorer therefore scores zero, and no method gains
from ties.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from common.errors import ConfigError
from common.nextbasket.baskets import CaseSet

KS: tuple[int, ...] = (10, 20)
PARTS: tuple[str, ...] = ("all", "repeat", "explore")
SAMPLED = "sampled-ndcg@10"


def metric_name(kind: str, k: int, part: str) -> str:
    base = f"{kind}@{k}"
    return base if part == "all" else f"{base}:{part}"


def metric_names(ks: tuple[int, ...] = KS) -> tuple[str, ...]:
    return tuple(
        metric_name(kind, k, part) for part in PARTS for kind in ("recall", "ndcg") for k in ks
    )


def pessimistic_ranks(
    row: np.ndarray, relevant: np.ndarray, ascending: np.ndarray | None = None
) -> np.ndarray:
    """0-based ranks of the catalogue slots ``relevant`` in ``row`` (scores, higher first),
    with every non-relevant item of equal score ranked above them. ``ascending`` is
    ``np.sort(row)`` if the caller has it already."""
    if len(relevant) == 0:
        return np.zeros(0, dtype=np.int64)
    if ascending is None:
        ascending = np.sort(row)
    values = row[relevant]
    above = len(row) - np.searchsorted(ascending, values, side="right")
    ties = np.searchsorted(ascending, values, side="right") - np.searchsorted(
        ascending, values, side="left"
    )
    order = np.argsort(-values, kind="stable")
    sorted_values = values[order]
    group_start = np.searchsorted(-sorted_values, -sorted_values, side="left")
    group_end = np.searchsorted(-sorted_values, -sorted_values, side="right")
    within = np.arange(len(values)) - group_start
    relevant_ties = group_end - group_start
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = above[order] + ties[order] - relevant_ties + within
    return ranks


def _ideal(k: int, size: int) -> float:
    return float(np.sum(1.0 / np.log2(np.arange(min(k, size)) + 2.0)))


def _part_values(
    ranks: np.ndarray, total: int, ks: tuple[int, ...]
) -> dict[tuple[str, int], float]:
    """Recall and NDCG at each k for one case and one part with ``total`` relevant items."""
    out: dict[tuple[str, int], float] = {}
    for k in ks:
        hits = ranks[ranks < k]
        out[("recall", k)] = len(hits) / total if total else math.nan
        gain = float(np.sum(1.0 / np.log2(hits + 2.0)))
        out[("ndcg", k)] = gain / _ideal(k, total) if total else math.nan
    return out


def case_metrics(
    scores: np.ndarray, cases: CaseSet, *, ks: tuple[int, ...] = KS
) -> dict[str, np.ndarray]:
    """Per-case metric values (NaN where the case does not count), keyed by metric name."""
    if scores.shape != (len(cases), len(cases.catalogue)):
        raise ConfigError(
            f"scores have shape {scores.shape}; expected (cases, catalogue) = "
            f"({len(cases)}, {len(cases.catalogue)})"
        )
    names = metric_names(ks)
    out = {name: np.full(len(cases), np.nan) for name in names}
    for i in range(len(cases)):
        lo, hi = cases.basket_indptr[i], cases.basket_indptr[i + 1]
        slots, repeat = cases.basket_slot[lo:hi], cases.basket_repeat[lo:hi]
        ascending = np.sort(scores[i])
        for part, chosen in (
            ("all", np.ones(hi - lo, bool)),
            ("repeat", repeat),
            ("explore", ~repeat),
        ):
            total = int(chosen.sum())
            rankable = slots[chosen & (slots >= 0)]
            ranks = pessimistic_ranks(scores[i], rankable, ascending)
            for (kind, k), value in _part_values(ranks, total, ks).items():
                out[metric_name(kind, k, part)][i] = value
    return out


def sampled_ndcg(
    scores: np.ndarray,
    cases: CaseSet,
    *,
    rng: np.random.Generator,
    negatives: int = 99,
    k: int = 10,
) -> np.ndarray:
    """The older sampled protocol, kept as a secondary figure: one bought catalogue item per
    case against ``negatives`` uniform catalogue items that the household did not buy in
    that basket; NaN for cases without a rankable item."""
    out = np.full(len(cases), np.nan)
    size = len(cases.catalogue)
    for i in range(len(cases)):
        lo, hi = cases.basket_indptr[i], cases.basket_indptr[i + 1]
        slots = cases.basket_slot[lo:hi]
        slots = slots[slots >= 0]
        if len(slots) == 0 or size - len(slots) < negatives:
            continue
        positive = slots[rng.integers(len(slots))]
        drawn = rng.integers(0, size, size=negatives)
        clash = np.isin(drawn, slots)
        while clash.any():
            drawn[clash] = rng.integers(0, size, size=int(clash.sum()))
            clash = np.isin(drawn, slots)
        candidates = np.r_[positive, drawn]
        rank = pessimistic_ranks(scores[i, candidates], np.array([0]))[0]
        out[i] = 1.0 / math.log2(rank + 2.0) if rank < k else 0.0
    return out


@dataclass(frozen=True)
class MetricSums:
    """Sum, sum of squares and count of each metric's per-case values.

    Additive across merchants: each merchant returns only these, the platform adds them and
    reads case-weighted means (and standard errors) without seeing any case.
    """

    sums: Mapping[str, float] = field(default_factory=dict)
    squares: Mapping[str, float] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, values: Mapping[str, np.ndarray]) -> MetricSums:
        sums, squares, counts = {}, {}, {}
        for name, array in values.items():
            kept = np.asarray(array, dtype=np.float64)
            kept = kept[~np.isnan(kept)]
            sums[name] = float(kept.sum())
            squares[name] = float(np.square(kept).sum())
            counts[name] = len(kept)
        return cls(sums, squares, counts)

    def __add__(self, other: MetricSums) -> MetricSums:
        names = set(self.counts) | set(other.counts)

        def total(a: Mapping[str, float], b: Mapping[str, float], n: str) -> float:
            return a.get(n, 0.0) + b.get(n, 0.0)

        return MetricSums(
            {n: total(self.sums, other.sums, n) for n in names},
            {n: total(self.squares, other.squares, n) for n in names},
            {n: self.counts.get(n, 0) + other.counts.get(n, 0) for n in names},
        )

    def mean(self, name: str) -> float:
        count = self.counts.get(name, 0)
        return self.sums[name] / count if count else math.nan

    def standard_error(self, name: str) -> float:
        count = self.counts.get(name, 0)
        if count < 2:
            return math.nan
        mean = self.sums[name] / count
        variance = max(self.squares[name] / count - mean * mean, 0.0) * count / (count - 1)
        return math.sqrt(variance / count)

    def means(self) -> dict[str, float]:
        return {name: self.mean(name) for name in sorted(self.counts)}

    def to_flat(self) -> dict[str, float]:
        """Plain numbers for a metrics message: ``name/sum``, ``name/sumsq``, ``name/count``."""
        flat: dict[str, float] = {}
        for name in sorted(self.counts):
            flat[f"{name}/sum"] = self.sums[name]
            flat[f"{name}/sumsq"] = self.squares[name]
            flat[f"{name}/count"] = float(self.counts[name])
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, float]) -> MetricSums:
        unknown = [k for k in flat if k.rsplit("/", 1)[-1] not in ("sum", "sumsq", "count")]
        if unknown:
            raise ConfigError(f"metric sums: unexpected keys {sorted(unknown)}")
        names = {key.rsplit("/", 1)[0] for key in flat}
        for name in names:
            for suffix in ("sum", "sumsq", "count"):
                if f"{name}/{suffix}" not in flat:
                    raise ConfigError(f"metric sums: {name!r} lacks its '/{suffix}' entry")
        counts = {n: int(flat[f"{n}/count"]) for n in names}
        if any(c < 0 or c != flat[f"{n}/count"] for n, c in counts.items()):
            raise ConfigError("metric sums: counts must be non-negative integers")
        return cls(
            {n: float(flat[f"{n}/sum"]) for n in names},
            {n: float(flat[f"{n}/sumsq"]) for n in names},
            counts,
        )


def bootstrap_ci(
    values: np.ndarray,
    *,
    rng: np.random.Generator,
    strata: np.ndarray | None = None,
    resamples: int = 2000,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the case-weighted mean of ``values`` (NaN = case does
    not count). With ``strata`` (e.g. the merchant of each case) cases are resampled within
    each stratum, so every merchant keeps its number of cases."""
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    values = np.asarray(values, dtype=np.float64)
    groups = np.zeros(len(values), dtype=np.int64) if strata is None else np.asarray(strata)
    kept = ~np.isnan(values)
    values, groups = values[kept], groups[kept]
    if len(values) == 0:
        return math.nan, math.nan
    totals = np.zeros(resamples)
    for group in np.unique(groups):
        members = values[groups == group]
        draws = rng.integers(0, len(members), size=(resamples, len(members)))
        totals += members[draws].sum(axis=1)
    means = totals / len(values)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
