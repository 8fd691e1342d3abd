"""Per-arm results of an A/B test, with 95% confidence intervals and a significance test.

Unit of analysis: the customer, because the arm is assigned per customer and one customer's
responses are not independent. Only responses whose attribution window has passed (``as_of``:
the newest purchase the merchant reported, unless given) count. Per response:

- *hit*: at least one product it showed was bought within the window (joined to it);
- *NDCG@10*: DCG of the shown products bought, by rank, over the ideal DCG of
  ``min(10, products bought)`` (the products joined to the response, shown or not); 0 when the
  customer bought nothing after it;
- *revenue-weighted hit rate*: revenue of joined purchases the response showed over revenue of
  all purchases joined to it (a ratio over all responses of the arm).

Each metric is a ratio of per-customer sums; the statistics (delta-method intervals, z test)
come from the per-arm sufficient statistics alone (common/ab_stats.py). Those sums are the
:attr:`AbReport.evidence`: aggregate counts that add up across merchants and may leave the
merchant (as online evidence for the platform's promotion gate); nothing else here may.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from client.serving.ab import Arm
from client.serving.store import ServingStore
from common.ab_stats import (
    METRICS,
    Comparison,
    Estimate,
    Evidence,
    RatioSums,
    compare,
    sample_problems,
)

NDCG_AT = 10


@dataclass(frozen=True)
class ArmResult:
    arm: str
    versions: tuple[int, ...]
    customers: int
    responses: int
    hits: int
    metrics: dict[str, Estimate]


@dataclass
class AbReport:
    experiment: int | None  # candidate version
    as_of: str
    window_hours: float
    arms: dict[str, ArmResult] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    too_small: str = ""
    evidence: Evidence = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.experiment is None:
            return "no A/B test: no response was served while a candidate was published"
        if self.too_small:
            return f"sample too small to conclude: {self.too_small}"
        primary = next(c for c in self.comparisons if c.metric == "hit_rate")
        if math.isnan(primary.p_value) or primary.p_value >= 0.05:
            return f"no significant difference in hit rate (p = {primary.p_value:.3g})"
        better = "better" if primary.difference > 0 else "worse"
        return f"candidate is {better} on hit rate (p = {primary.p_value:.3g})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment_candidate_version": self.experiment,
            "as_of": self.as_of,
            "attribution_window_hours": self.window_hours,
            "verdict": self.verdict,
            "too_small": self.too_small,
            "arms": {
                name: {
                    "versions": list(arm.versions),
                    "customers": arm.customers,
                    "responses": arm.responses,
                    "hits": arm.hits,
                    **{k: e.__dict__ for k, e in arm.metrics.items()},
                }
                for name, arm in self.arms.items()
            },
            "comparisons": [c.__dict__ for c in self.comparisons],
            "evidence": {
                arm: {
                    metric: dict(zip(("n", "x", "y", "xx", "yy", "xy"), s.as_tuple(), strict=True))
                    for metric, s in sums.items()
                }
                for arm, sums in self.evidence.items()
            },
        }


def _responses(
    store: ServingStore, candidate: int, window_ns: int, as_of_ns: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    with store.connect() as conn:
        responses = pd.read_sql_query(
            "SELECT id, customer, arm, version FROM impressions "
            "WHERE candidate = ? AND at_ns + ? <= ?",
            conn,
            params=(candidate, window_ns, as_of_ns),
        )
        joined = pd.read_sql_query(
            "SELECT p.impression AS id, p.product, p.rank, p.revenue FROM purchases AS p "
            "JOIN impressions AS i ON i.id = p.impression "
            "WHERE i.candidate = ? AND i.at_ns + ? <= ?",
            conn,
            params=(candidate, window_ns, as_of_ns),
        )
    return responses, joined


def per_response(responses: pd.DataFrame, joined: pd.DataFrame) -> pd.DataFrame:
    """One row per response: customer, arm, hit, ndcg, shown and total revenue."""
    distinct = joined.sort_values("rank").drop_duplicates(["id", "product"])
    shown = distinct[distinct["rank"].notna()]
    gains = (1.0 / np.log2(shown["rank"].astype(float) + 1.0)).where(shown["rank"] <= NDCG_AT, 0.0)
    dcg = gains.groupby(shown["id"]).sum()
    bought = distinct.groupby("id").size()
    ideal_terms = 1.0 / np.log2(np.arange(1, NDCG_AT + 1) + 1.0)
    ideal = bought.clip(upper=NDCG_AT).map(lambda n: float(ideal_terms[: int(n)].sum()))
    revenue = joined.groupby("id")["revenue"].sum()
    shown_revenue = joined[joined["rank"].notna()].groupby("id")["revenue"].sum()
    out = responses.set_index("id")
    out["hit"] = shown.groupby("id").size().reindex(out.index, fill_value=0).gt(0).astype(float)
    out["ndcg"] = (dcg / ideal).reindex(out.index).fillna(0.0)
    out["revenue"] = revenue.reindex(out.index, fill_value=0.0)
    out["shown_revenue"] = shown_revenue.reindex(out.index, fill_value=0.0)
    return out.reset_index()


def _arm_sums(rows: pd.DataFrame) -> dict[str, RatioSums]:
    by = rows.groupby("customer")
    count = by.size().to_numpy(dtype=float)
    return {
        "hit_rate": RatioSums.of(count, by["hit"].sum().to_numpy()),
        "ndcg@10": RatioSums.of(count, by["ndcg"].sum().to_numpy()),
        "revenue_hit_rate": RatioSums.of(
            by["revenue"].sum().to_numpy(), by["shown_revenue"].sum().to_numpy()
        ),
    }


def latest_experiment(store: ServingStore) -> int | None:
    with store.connect() as conn:
        row = conn.execute(
            "SELECT candidate FROM impressions WHERE candidate IS NOT NULL "
            "ORDER BY at_ns DESC LIMIT 1"
        ).fetchone()
    return None if row is None else int(row[0])


def newest_purchase(store: ServingStore) -> int | None:
    with store.connect() as conn:
        (value,) = conn.execute("SELECT MAX(at_ns) FROM purchases").fetchone()
    return None if value is None else int(value)


def ab_report(
    store: ServingStore,
    *,
    window: timedelta,
    min_customers: int,
    candidate: int | None = None,
    as_of: datetime | None = None,
) -> AbReport:
    """The report of the experiment on ``candidate`` (default: the latest one served)."""
    experiment = candidate if candidate is not None else latest_experiment(store)
    as_of_ns = int(as_of.timestamp() * 1e9) if as_of is not None else newest_purchase(store)
    stamp = "no purchase reported yet"
    if as_of_ns is not None:
        stamp = pd.Timestamp(as_of_ns, tz="UTC").isoformat()
    as_of_ns = as_of_ns or 0
    report = AbReport(experiment, stamp, window.total_seconds() / 3600)
    if experiment is None:
        return report
    responses, joined = _responses(store, experiment, int(window.total_seconds() * 1e9), as_of_ns)
    rows = per_response(responses, joined)
    for arm in (Arm.CONTROL.value, Arm.CANDIDATE.value):
        part = rows[rows["arm"] == arm]
        sums = _arm_sums(part)
        report.evidence[arm] = sums
        report.arms[arm] = ArmResult(
            arm=arm,
            versions=tuple(sorted(int(v) for v in part["version"].unique())),
            customers=int(part["customer"].nunique()),
            responses=len(part),
            hits=int(part["hit"].sum()),
            metrics={metric: s.estimate() for metric, s in sums.items()},
        )
    report.too_small = sample_problems(report.evidence, min_customers)
    control, candidate_sums = (
        report.evidence[Arm.CONTROL.value],
        report.evidence[Arm.CANDIDATE.value],
    )
    report.comparisons = [compare(m, control[m], candidate_sums[m]) for m in METRICS]
    return report
