"""The merchant's neighbour scores: TIFU-KNN over its own households, for the local blend."""

from __future__ import annotations

import numpy as np
import pytest

from common.nextbasket import baselines
from common.nextbasket.baselines import TifuParams
from common.nextbasket.baskets import basket_log, heldout_cases
from common.nextbasket.local import LocalHead, LocalState
from common.nextbasket.neighbours import NeighbourIndex
from tests.test_nextbasket_model import shop_events


@pytest.fixture(scope="module")
def shop():
    log = basket_log(shop_events(seed=5, customers=30))
    cases = heldout_cases(log, period=(9, 10), catalogue_weeks=(1, 8))
    return log, cases


@pytest.mark.parametrize(
    "params",
    [TifuParams(), TifuParams(group_size=2, within_decay=1.0, group_decay=0.5, neighbours=3)],
)
def test_scores_are_tifu_knn_divided_by_each_households_largest(shop, params):
    """The sparse index computes what the TIFU-KNN baseline computes densely."""
    log, cases = shop
    before = float(cases.day.min())
    index = NeighbourIndex.build(log, before_day=before, catalogue=cases.catalogue, params=params)
    got = index.scores(cases)
    pool = baselines._tifu_pool(log, cases, params)
    expected = baselines._tifu_blend(pool, params.neighbours, params.alpha)
    expected = expected / np.where(expected.max(1, keepdims=True) > 0, expected.max(1)[:, None], 1)
    assert got.shape == (len(cases), len(cases.catalogue)) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(got.max(axis=1), 1.0)
    np.testing.assert_array_equal(index.scores(cases, batch_cases=3), got)  # chunks change nothing
    # memory follows the events: one stored value per (household, product) bought
    assert index.vectors.nnz <= len(log)


def test_a_household_is_not_its_own_neighbour_and_cold_start_is_not_an_error(shop):
    log, cases = shop
    params = TifuParams(neighbours=1, alpha=0.0)  # the score is the one nearest household
    index = NeighbourIndex.build(
        log, before_day=float(cases.day.min()), catalogue=cases.catalogue, params=params
    )
    has = np.flatnonzero(cases.history_end > cases.history_start)
    first = cases.subset(has[:1])
    own = index.vectors[first.customer[0]].toarray()[0]
    nearest = index.scores(first)[0]
    assert not np.allclose(nearest, own / own.max())  # someone else's basket vector
    cold = first.subset(np.array([0]))
    cold = type(cold)(**{**cold.__dict__, "history_end": cold.history_start.copy()})
    scores = index.scores(cold)
    assert np.isfinite(scores).all() and scores.max() == pytest.approx(1.0)


def test_the_blend_needs_neighbour_scores_when_it_weighs_them(tmp_path):
    raw, popularity = np.zeros((2, 3)), np.array([1.0, 2.0, 3.0])
    neighbours = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]], dtype=np.float32)
    head = LocalHead(0.0, 2.0)
    np.testing.assert_allclose(head.apply(raw, popularity, neighbours), 2.0 * neighbours)
    with pytest.raises(ValueError, match="neighbour scores"):
        head.apply(raw, popularity)
    blend_only = LocalHead(0.5).apply(raw, popularity)  # no neighbour scores needed
    np.testing.assert_allclose(blend_only, np.tile(0.5 * np.log1p(popularity), (2, 1)))
    path = tmp_path / "state.npz"
    LocalState("store-1", head).save(path)
    assert LocalState.load(path, merchant_id="store-1").head == head
