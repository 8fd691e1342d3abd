"""Full-ranking next-basket metrics against hand-computed cases (docs/evaluation.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError
from common.nextbasket.baskets import CaseSet
from common.nextbasket.metrics import (
    MetricSums,
    bootstrap_ci,
    case_metrics,
    metric_names,
    pessimistic_ranks,
    sampled_ndcg,
)

LOG3 = 1 / math.log2(3)  # gain of rank 1 (0-based)
LOG4 = 1 / math.log2(4)


def make_cases(baskets: list[list[tuple[int, bool]]], catalogue_size: int) -> CaseSet:
    """Cases over catalogue slots 0..size-1 (product code = slot); a basket item is
    (product code, bought before); a code >= size is outside the catalogue."""
    sizes = [len(b) for b in baskets]
    products = np.array([p for b in baskets for p, _ in b], dtype=np.int64)
    n = len(baskets)
    return CaseSet(
        merchant_id="m",
        customer=np.arange(n),
        day=np.zeros(n),
        history_start=np.zeros(n, dtype=np.int64),
        history_end=np.zeros(n, dtype=np.int64),
        basket_indptr=np.r_[0, np.cumsum(sizes)].astype(np.int64),
        basket_products=products,
        basket_slot=np.where(products < catalogue_size, products, -1),
        basket_repeat=np.array([r for b in baskets for _, r in b], dtype=bool),
        catalogue=np.arange(catalogue_size),
    )


def test_hand_computed_recall_and_ndcg():
    # catalogue A=0, B=1, C=2, D=3; ranking A, C, B, D; basket {A, B}
    cases = make_cases([[(0, False), (1, False)]], 4)
    values = case_metrics(np.array([[0.9, 0.7, 0.8, 0.1]]), cases, ks=(2, 3))
    assert values["recall@2"][0] == pytest.approx(0.5)
    assert values["ndcg@2"][0] == pytest.approx(1.0 / (1.0 + LOG3))
    assert values["recall@3"][0] == pytest.approx(1.0)
    assert values["ndcg@3"][0] == pytest.approx((1.0 + LOG4) / (1.0 + LOG3))


def test_ties_rank_relevant_items_last():
    cases = make_cases([[(0, False), (1, False)]], 4)
    values = case_metrics(np.zeros((1, 4)), cases, ks=(2, 3))
    assert values["recall@2"][0] == 0.0
    assert values["ndcg@2"][0] == 0.0
    assert values["recall@3"][0] == pytest.approx(0.5)
    assert values["ndcg@3"][0] == pytest.approx(LOG4 / (1.0 + LOG3))


def test_pessimistic_ranks_with_partial_ties():
    row = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
    # relevant slots 0 and 3 tie with slot 2 (not relevant): 2 goes first
    assert sorted(pessimistic_ranks(row, np.array([0, 3]))) == [2, 3]
    assert list(pessimistic_ranks(row, np.array([1]))) == [0]
    assert list(pessimistic_ranks(row, np.array([4]))) == [4]


def test_items_outside_the_catalogue_are_misses():
    cases = make_cases([[(0, False), (9, False)]], 4)  # product 9 was never sold
    values = case_metrics(np.array([[1.0, 0.0, 0.0, 0.0]]), cases, ks=(2,))
    assert values["recall@2"][0] == pytest.approx(0.5)
    assert values["ndcg@2"][0] == pytest.approx(1.0 / (1.0 + LOG3))


def test_repeat_and_explore_parts():
    # A (repeat) ranked first, B (explore) third
    cases = make_cases([[(0, True), (1, False)]], 4)
    values = case_metrics(np.array([[0.9, 0.7, 0.8, 0.1]]), cases, ks=(10,))
    assert values["ndcg@10:repeat"][0] == pytest.approx(1.0)
    assert values["recall@10:explore"][0] == pytest.approx(1.0)
    assert values["ndcg@10:explore"][0] == pytest.approx(LOG4)  # rank 2, ideal 1


def test_an_empty_part_or_basket_does_not_count():
    cases = make_cases([[(0, False)], []], 4)
    values = case_metrics(np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]), cases)
    assert math.isnan(values["ndcg@10:repeat"][0])  # no repeat item in case 0
    assert values["ndcg@10:explore"][0] == pytest.approx(1.0)
    assert all(math.isnan(values[name][1]) for name in metric_names())
    sums = MetricSums.of(values)
    assert sums.counts["ndcg@10"] == 1
    assert sums.counts["ndcg@10:repeat"] == 0
    assert math.isnan(sums.mean("ndcg@10:repeat"))


def test_scores_must_cover_the_catalogue():
    cases = make_cases([[(0, False)]], 4)
    with pytest.raises(ConfigError, match="expected"):
        case_metrics(np.zeros((1, 3)), cases)


def test_metric_sums_add_up_across_merchants():
    a = {"ndcg@10": np.array([0.2, np.nan, 0.4])}
    b = {"ndcg@10": np.array([1.0])}
    total = MetricSums.of(a) + MetricSums.of(b)
    assert total.counts["ndcg@10"] == 3
    assert total.mean("ndcg@10") == pytest.approx((0.2 + 0.4 + 1.0) / 3)
    sample = np.array([0.2, 0.4, 1.0])
    assert total.standard_error("ndcg@10") == pytest.approx(sample.std(ddof=1) / math.sqrt(3))
    assert MetricSums.from_flat(total.to_flat()) == total


def test_metric_sums_reject_incomplete_records():
    with pytest.raises(ConfigError, match="lacks"):
        MetricSums.from_flat({"ndcg@10/sum": 1.0, "ndcg@10/count": 2.0})
    with pytest.raises(ConfigError, match="unexpected"):
        MetricSums.from_flat(
            {"ndcg@10/sum": 1.0, "ndcg@10/sumsq": 1.0, "ndcg@10/count": 2.0, "x/y": 1}
        )


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(0, 2**31))
def test_bootstrap_interval_brackets_the_mean(values, seed):
    data = np.array(values)
    low, high = bootstrap_ci(data, rng=np.random.default_rng(seed), resamples=300)
    assert data.min() - 1e-12 <= low <= high <= data.max() + 1e-12


def test_stratified_bootstrap_keeps_each_stratum_whole():
    # two strata with constant values: every resample has the same case-weighted mean
    values = np.array([0.0, 0.0, 0.0, 1.0])
    strata = np.array([0, 0, 0, 1])
    low, high = bootstrap_ci(values, rng=np.random.default_rng(0), strata=strata, resamples=200)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_sampled_ndcg_is_one_when_the_positive_scores_highest():
    cases = make_cases([[(3, False)]], 200)
    scores = np.zeros((1, 200))
    scores[0, 3] = 1.0
    assert sampled_ndcg(scores, cases, rng=np.random.default_rng(0))[0] == 1.0
    assert sampled_ndcg(np.zeros((1, 200)), cases, rng=np.random.default_rng(0))[0] == 0.0
