"""A/B tests at the merchant: stable, balanced arms; per-arm statistics checked against
textbook references and by simulation; the report on a served experiment."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from client.serving.ab import Arm, ArmAssigner, ensure_assignment_key, experiment_name
from client.serving.ab_report import RatioSums, ab_report, compare
from client.serving.feedback import record_purchases
from client.serving.runtime import ServingRuntime
from client.serving.store import ServingStore
from common.errors import IntegrityError
from common.events import validate_events

sys.path.insert(0, str(Path(__file__).parent / "support"))
from serving_world import World, make_world

T0 = datetime(2030, 3, 1, tzinfo=UTC)


def test_arms_are_stable_across_restarts_and_balanced(tmp_path: Path) -> None:
    key = ensure_assignment_key(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "ab-assignment.key").st_mode) == 0o600
    customers = [f"c{i}" for i in range(20_000)]
    first = [ArmAssigner(key, share=0.3).arm(c, "candidate-v7") for c in customers]
    restarted = ArmAssigner(ensure_assignment_key(tmp_path), share=0.3)  # same key file
    assert [restarted.arm(c, "candidate-v7") for c in customers] == first
    share = sum(a is Arm.CANDIDATE for a in first) / len(customers)
    sigma = math.sqrt(0.3 * 0.7 / len(customers))
    assert abs(share - 0.3) < 4 * sigma
    # A new experiment draws a fresh split, independent of the last one.
    second = [restarted.arm(c, "candidate-v8") for c in customers]
    both = sum(a is b is Arm.CANDIDATE for a, b in zip(first, second, strict=True)) / len(customers)
    assert abs(both - 0.09) < 4 * math.sqrt(0.09 * 0.91 / len(customers))
    # Another merchant's key gives another split.
    other = ArmAssigner(os.urandom(32), share=0.3)
    same = sum(other.arm(c, "candidate-v7") is a for c, a in zip(customers, first, strict=True))
    assert same / len(customers) < 0.65
    (tmp_path / "ab-assignment.key").write_bytes(b"short")
    with pytest.raises(IntegrityError, match="restore it"):
        ensure_assignment_key(tmp_path)


def test_only_the_configured_share_gets_the_candidate(tmp_path: Path) -> None:
    world = make_world(tmp_path, customers=300)
    world.with_serving(ab_share=0.5)
    v1, v2 = world.register(1), world.register(2)
    world.publish(serving=v1, candidate=v2)
    runtime = ServingRuntime(world.merchant, store=ServingStore(world.merchant.serving_dir))
    runtime.refresh()
    customers = [str(c) for c in world.events["customer_id"].unique()] + ["n1", "n2"]
    served = {c: runtime.recommend(c, 5) for c in customers}
    again = {c: runtime.recommend(c, 5) for c in customers}
    assert all(served[c].arm is again[c].arm for c in customers)
    for c, rec in served.items():
        expected = runtime.assigner.arm(c, experiment_name(v2))
        assert rec.arm is expected and rec.version == (v2 if expected is Arm.CANDIDATE else v1)
    share = sum(rec.arm is Arm.CANDIDATE for rec in served.values()) / len(served)
    assert 0.38 < share < 0.62
    runtime.writer.flush()
    assert runtime.store.counts()["impressions"] == 2 * len(customers)
    runtime.stop()

    off = replace(world.merchant, serving=replace(world.merchant.serving, ab_share=0.0))
    quiet = ServingRuntime(off, store=ServingStore(off.serving_dir))
    quiet.refresh()
    assert quiet.state is not None and quiet.state.candidate is None
    assert {quiet.recommend(c, 5).version for c in customers} == {v1}
    quiet.stop()


def test_ratio_standard_error_matches_the_textbook_cases() -> None:
    rng = np.random.default_rng(0)
    y = rng.binomial(1, 0.3, size=500).astype(float)
    sums = RatioSums.of(np.ones_like(y), y)
    estimate = sums.estimate()
    assert estimate.value == pytest.approx(y.mean())
    assert estimate.se == pytest.approx(stats.sem(y), rel=1e-12)  # one response per customer
    # Several responses per customer: the delta method from per-customer arrays.
    x = rng.integers(1, 6, size=400).astype(float)
    y = rng.binomial(x.astype(int), 0.2).astype(float)
    ratio = y.sum() / x.sum()
    reference = math.sqrt(len(x) / (len(x) - 1) * np.sum((y - ratio * x) ** 2)) / x.sum()
    half = len(x) // 2
    pooled = RatioSums.of(x[:half], y[:half]) + RatioSums.of(x[half:], y[half:])
    assert pooled.estimate().value == pytest.approx(ratio)
    assert pooled.estimate().se == pytest.approx(reference, rel=1e-9)


def test_intervals_cover_and_the_test_holds_its_level_by_simulation() -> None:
    rng = np.random.default_rng(1)
    covered, rejected, runs = 0, 0, 400
    for _ in range(runs):
        arms = []
        for _ in range(2):
            responses = rng.integers(1, 8, size=300).astype(float)
            taste = rng.beta(2, 8, size=300)  # customers differ: responses are clustered
            hits = rng.binomial(responses.astype(int), taste).astype(float)
            arms.append(RatioSums.of(responses, hits))
        estimate = arms[0].estimate()
        covered += estimate.low <= 0.2 <= estimate.high  # E[taste] = 0.2
        rejected += compare("hit_rate", arms[0], arms[1]).p_value < 0.05
    assert 0.92 <= covered / runs <= 0.98
    assert 0.02 <= rejected / runs <= 0.09


def serve_experiment(world: World, *, lift: float, customers: int) -> tuple[ServingRuntime, int]:
    """Serve a 50/50 test; each customer buys within a day, from what it was shown with a
    probability that is higher in the candidate arm by ``lift``."""
    world.with_serving(ab_share=0.5, min_customers_per_arm=20)
    v1, v2 = world.register(1), world.register(2)
    world.publish(serving=v1, candidate=v2)
    clock = [int(T0.timestamp() * 1e9)]
    runtime = ServingRuntime(
        world.merchant, store=ServingStore(world.merchant.serving_dir), clock_ns=lambda: clock[0]
    )
    runtime.refresh()
    rng = np.random.default_rng(5)
    rows = []
    for i, customer in enumerate(world.events["customer_id"].unique()[:customers]):
        clock[0] += 60 * 10**9
        rec = runtime.recommend(str(customer), 10)
        rate = 0.25 + (lift if rec.arm is Arm.CANDIDATE else 0.0)
        product = rec.products[int(rng.integers(0, 10))] if rng.random() < rate else f"x{i}"
        when = pd.Timestamp(clock[0], tz="UTC") + pd.Timedelta(hours=2)
        rows.append((str(customer), product, when))
    runtime.writer.flush()
    frame = pd.DataFrame(rows, columns=["customer_id", "product_id", "timestamp"])
    frame.insert(0, "merchant_id", world.merchant.id)
    frame = frame.assign(quantity=1.0, price=2.0, category="", department="", brand="")
    late = T0 + timedelta(days=30)  # a later purchase moves "purchases known until" on
    tail = frame.iloc[:1].assign(timestamp=pd.Timestamp(late), product_id="late")
    canonical = validate_events(pd.concat([frame, tail]), source="test purchases")
    record_purchases(canonical, world.merchant, runtime.store, source="test")
    return runtime, v2


def test_report_finds_a_real_difference_and_counts_by_hand(tmp_path: Path) -> None:
    world = make_world(tmp_path, customers=600)
    runtime, v2 = serve_experiment(world, lift=0.3, customers=600)
    report = ab_report(runtime.store, window=timedelta(days=7), min_customers=20)
    runtime.stop()
    assert report.experiment == v2 and not report.too_small
    with runtime.store.connect() as conn:
        by_arm = dict(
            conn.execute(
                "SELECT i.arm, COUNT(DISTINCT p.impression) FROM purchases AS p "
                "JOIN impressions AS i ON i.id = p.impression WHERE p.rank IS NOT NULL "
                "GROUP BY i.arm"
            ).fetchall()
        )
    for arm in ("control", "candidate"):
        assert report.arms[arm].hits == by_arm[arm]
        assert report.arms[arm].customers == report.arms[arm].responses  # one response each
    hit = next(c for c in report.comparisons if c.metric == "hit_rate")
    assert hit.difference > 0.15 and hit.p_value < 0.001
    assert report.verdict.startswith("candidate is better")
    evidence = json.dumps(report.to_dict()["evidence"])
    assert not any(str(c) in evidence for c in world.events["customer_id"].unique()[:50])


def test_report_says_when_the_sample_is_too_small(tmp_path: Path) -> None:
    world = make_world(tmp_path, customers=60)
    runtime, _ = serve_experiment(world, lift=0.0, customers=30)
    report = ab_report(runtime.store, window=timedelta(days=7), min_customers=100)
    runtime.stop()
    assert "need >= 100" in report.too_small
    assert report.verdict.startswith("sample too small to conclude")


def test_only_aggregate_evidence_leaves_and_it_feeds_the_online_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from client.serving.evidence import evidence_reply
    from common import protocol as P
    from common.ab_stats import pool
    from server.ab_evidence import EvidenceReport, evidence_messages, online_gate, record_evidence

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    world = make_world(tmp_path, customers=600)
    runtime, v2 = serve_experiment(world, lift=0.3, customers=600)
    runtime.stop()
    (message,) = evidence_messages(v2, [3])
    reply = evidence_reply(message.content[P.CONFIG], world.merchant)
    status, metrics = reply[P.STATUS], reply[P.METRICS]
    sent = dict(metrics)  # type: ignore[call-overload]
    assert len(sent) == 2 * 3 * 6  # arms x metrics x (n, x, y, xx, yy, xy): numbers only
    assert all(re.fullmatch(r"(control|candidate)/[a-z_@0-9]+/(n|x|y|xx|yy|xy)", k) for k in sent)
    assert all(isinstance(v, float) for v in sent.values())

    report = EvidenceReport(v2)
    record_evidence(report, status, metrics)  # type: ignore[arg-type]
    assert list(report.evidence) == [world.merchant.id]
    local = ab_report(runtime.store, window=timedelta(days=7), min_customers=20)
    assert report.evidence[world.merchant.id] == local.evidence
    decision = online_gate(report.pooled(), min_customers=20)
    assert decision.promote and "promoted" in decision.reason
    worse = {"control": local.evidence["candidate"], "candidate": local.evidence["control"]}
    assert not online_gate(pool([worse]), min_customers=20).promote
    assert not online_gate(report.pooled(), min_customers=10_000).promote  # too small
    record_evidence(report, status, {"control/hit_rate/n": 1.0, "bogus": 2.0})  # type: ignore[arg-type]
    assert world.merchant.id in report.failed
