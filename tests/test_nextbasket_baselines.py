"""Baskets, cases, household features and the local baselines on a tiny worked example.

The shop: products A, B, C (sold in weeks 1-2) and D (first sold in week 3).
- household a: day 0 {A, B}, day 7 {A}, day 14 (week 3) {A, C, D}
- household b: day 3 {C}, day 15 (week 3) {A}
- household c: day 16 (week 3) {B} (no history: cold start)
Categories: A and C are "x", B and D are "y".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from common.errors import DataValidationError
from common.nextbasket.baselines import (
    AlsParams,
    TifuParams,
    als_scores,
    break_ties,
    g_topfreq,
    p_topfreq,
    tifu_knn,
    tune_tifu,
)
from common.nextbasket.baskets import basket_cases, basket_log, heldout_cases
from common.nextbasket.features import FEATURES, history_features, merchant_popularity

ORIGIN = pd.Timestamp("2024-01-01 10:00", tz="UTC")
CATEGORY = {"A": "x", "B": "y", "C": "x", "D": "y"}


def events(rows: list[tuple[str, int, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "merchant_id": "shop",
            "customer_id": [c for c, _, _ in rows],
            "product_id": [p for _, _, p in rows],
            "timestamp": [ORIGIN + pd.Timedelta(days=d) for _, d, _ in rows],
            "category": [CATEGORY[p] for _, _, p in rows],
            "department": "food",
            "week": [d // 7 + 1 for _, d, _ in rows],
        }
    )


SHOP = events(
    [
        ("a", 0, "A"), ("a", 0, "B"), ("a", 7, "A"),
        ("a", 14, "A"), ("a", 14, "C"), ("a", 14, "D"),
        ("b", 3, "C"), ("b", 15, "A"),
        ("c", 16, "B"),
    ]
)  # fmt: skip


@pytest.fixture(scope="module")
def shop():
    log = basket_log(SHOP)
    cases = heldout_cases(log, period=(3, 3), catalogue_weeks=(1, 2))
    return log, cases


def product(log, name: str) -> int:
    return int(np.flatnonzero(log.product_ids == name)[0])


def test_cases_are_first_baskets_with_their_history(shop):
    log, cases = shop
    assert list(log.customer_ids[cases.customer]) == ["a", "b", "c"]
    bought_by_a = [log.product_ids[p] for p in log.product[log.customer == 0]]
    assert bought_by_a == ["A", "B", "A", "A", "C", "D"]
    assert list(cases.history_end - cases.history_start) == [3, 1, 0]
    assert list(log.product_ids[cases.catalogue]) == ["A", "B", "C"]
    basket_a = slice(cases.basket_indptr[0], cases.basket_indptr[1])
    assert list(log.product_ids[cases.basket_products[basket_a]]) == ["A", "C", "D"]
    assert list(cases.basket_repeat[basket_a]) == [True, False, False]
    assert list(cases.basket_slot[basket_a]) == [0, 2, -1]  # D was never sold: unrankable


def test_training_cases_are_every_basket(shop):
    log, _ = shop
    train = basket_cases(log, weeks=(1, 2), catalogue_weeks=(1, 2))
    assert list(log.customer_ids[train.customer]) == ["a", "a", "b"]  # days 0, 7, 3
    assert list(train.history_end - train.history_start) == [0, 2, 0]


def test_a_log_holds_one_merchant():
    two = pd.concat([SHOP, SHOP.assign(merchant_id="other")])
    with pytest.raises(DataValidationError, match="2 merchants"):
        basket_log(two)
    with pytest.raises(DataValidationError, match="category"):
        basket_log(SHOP.drop(columns=["category"]))


def test_household_features_by_hand(shop):
    log, cases = shop
    features = history_features(log, cases)
    names = {n: i for i, n in enumerate(FEATURES)}
    a, b = product(log, "A"), product(log, "B")
    got_a, got_b, got_c = features.lookup(np.array([0, 0, 0]), np.array([a, b, product(log, "C")]))
    expected_a = {
        "in_history": 1.0,
        "log_count": math.log1p(2),
        "share_of_baskets": 1.0,
        "log_decayed_count_14d": math.log1p(0.5 + 2**-0.5),
        "log_decayed_count_60d": math.log1p(2 ** (-14 / 60) + 2 ** (-7 / 60)),
        "basket_decay_0.7": 1.0,  # bought in every basket
        "basket_decay_0.9": 1.0,
        "log_days_since": math.log1p(7),
        "in_last_basket": 1.0,
        "bought_twice": 1.0,
        "log_interval": math.log1p(7),
        "due": 0.0,
        "log_baskets": math.log1p(2),
        "log_days_since_visit": math.log1p(7),
        "log_products": math.log1p(2),
        "log_basket_size": math.log1p(1.5),
        "repeat_ratio": 1 / 3,
        "log_tenure": math.log1p(14),
        "cold_start": 0.0,
        "category_share": 2 / 3,
    }
    for name, value in expected_a.items():
        assert got_a[names[name]] == pytest.approx(value, rel=1e-5), name
    assert got_b[names["share_of_baskets"]] == pytest.approx(0.5)
    assert got_b[names["basket_decay_0.7"]] == pytest.approx(0.7 * 0.3 / 0.51, rel=1e-5)
    assert got_b[names["in_last_basket"]] == 0.0
    assert got_b[names["category_share"]] == pytest.approx(1 / 3)
    # C is not in a's history: no repeat features, but a's share of category x
    assert got_c[names["in_history"]] == 0.0 and got_c[names["log_count"]] == 0.0
    assert got_c[names["category_share"]] == pytest.approx(2 / 3)
    cold = features.lookup(np.array([2]), np.array([a]))[0]
    assert cold[names["cold_start"]] == 1.0
    assert np.count_nonzero(cold) == 1


def test_features_of_a_household_ignore_other_households():
    log = basket_log(SHOP)
    alone = basket_log(SHOP[SHOP["customer_id"] == "a"])
    cases = heldout_cases(log, period=(3, 3), catalogue_weeks=(1, 2))
    alone_cases = heldout_cases(alone, period=(3, 3), catalogue_weeks=(1, 2))
    names = ["A", "B", "C"]
    codes = [product(log, n) for n in names]
    alone_codes = [product(alone, n) if n in alone.product_ids else 0 for n in names]
    full = history_features(log, cases).lookup(np.zeros(3, int), np.array(codes))
    own = history_features(alone, alone_cases).lookup(np.zeros(3, int), np.array(alone_codes))
    assert np.allclose(full[:2], own[:2])


def test_g_and_p_topfreq(shop):
    log, cases = shop
    popularity = merchant_popularity(log, before_week=3)
    assert list(popularity[cases.catalogue]) == [2, 1, 1]  # baskets with A, B, C
    g = g_topfreq(cases, popularity)
    assert (g == [2.0, 1.0, 1.0]).all()
    p = p_topfreq(log, cases, popularity)
    # a: counts A 2, B 1, C 0, each plus popularity / (max + 1)
    assert p[0] == pytest.approx([2 + 2 / 3, 1 + 1 / 3, 0 + 1 / 3])
    assert p[2] == pytest.approx([2 / 3, 1 / 3, 1 / 3])  # cold start: popularity only


@pytest.mark.parametrize(
    "params",
    [
        TifuParams(group_size=1, within_decay=1.0, group_decay=0.5, neighbours=1, alpha=0.5),
        TifuParams(group_size=2, within_decay=0.5, group_decay=1.0, neighbours=1, alpha=0.5),
    ],
)
def test_tifu_knn_by_hand(shop, params):
    log, cases = shop
    popularity = merchant_popularity(log, before_week=3)
    scores = tifu_knn(log, cases.subset(np.array([0])), popularity, params)
    # a: (1 x [A] + 0.5 x [A, B]) / 2 = A 0.75, B 0.25 (newest basket or group weighs 1)
    # nearest other household: b = [C]; blend 0.5/0.5 -> A 0.375, B 0.125, C 0.5
    assert list(np.argsort(-scores[0])) == [2, 0, 1]
    raw = 0.5 * np.array([0.75, 0.25, 0.0]) + 0.5 * np.array([0.0, 0.0, 1.0])
    assert (np.argsort(-raw) == np.argsort(-scores[0])).all()


def test_break_ties_keeps_order_and_uses_popularity():
    scores = np.array([[1.0, 0.0, 0.0, 2.0]])
    out = break_ties(scores, np.array([0.0, 5.0, 1.0, 0.0]))
    assert list(np.argsort(-out[0])) == [3, 0, 1, 2]


def test_als_scores_cover_each_catalogue(shop):
    log, cases = shop
    popularity = {"shop": merchant_popularity(log, before_week=3)}
    out = als_scores(
        {"shop": log},
        {"shop": cases},
        popularity,
        before_week=3,
        params=AlsParams(factors=2, iterations=3),
        seed=0,
    )
    assert out["shop"].shape == (3, 3)
    assert np.isfinite(out["shop"]).all()


def test_tifu_tuning_returns_the_grid_point_it_scored(shop):
    log, cases = shop
    popularity = merchant_popularity(log, before_week=3)
    seen = []

    def objective(scores):
        seen.append(scores)
        return float(scores[0, 2] - scores[0, 0])  # prefer C over A for household a

    grid = {
        "group_size": (1, 2),
        "within_decay": (1.0,),
        "group_decay": (0.5,),
        "neighbours": (1,),
        "alpha": (0.2, 0.9),
    }
    best, value = tune_tifu(log, cases, popularity, objective, grid)
    assert len(seen) == 4
    assert best.alpha == 0.2  # more weight on the neighbour, who bought C
    assert objective(tifu_knn(log, cases, popularity, best)) == pytest.approx(value)


def test_nextbasket_is_torch_free_except_the_model():
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "common" / "nextbasket"
    for path in package.glob("*.py"):
        if path.name == "model.py":
            continue
        tree = ast.parse(path.read_text())
        names = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not names & {"torch", "opacus"}, path.name
