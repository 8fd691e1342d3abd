"""DP training records: candidates, sampling corrections, and dependence on own data only."""

from __future__ import annotations

import numpy as np
import pytest

from common.accounting import PrivacyUnit
from common.nextbasket.baskets import basket_cases, basket_log
from common.nextbasket.features import history_features
from common.nextbasket.records import (
    NEGATIVE,
    PADDING,
    POSITIVE,
    basket_candidates,
    count_records,
    item_ids,
    training_records,
)
from common.nextbasket.spec import RecordSpec, ScorerSpec
from tests.test_nextbasket_model import shop_events

SPEC = ScorerSpec(product_buckets=1 << 20, category_buckets=16, department_buckets=8)  # no clashes
RECORDS = RecordSpec(max_positives=3, history_negatives=2, uniform_negatives=5)


def build(frame, unit=PrivacyUnit.EVENT, seed=0):
    log = basket_log(frame)
    cases = basket_cases(log, weeks=(1, 9), catalogue_weeks=(1, 9))
    features = history_features(log, cases)
    records = training_records(
        cases, features, item_ids(log, SPEC), unit=unit, spec=RECORDS,
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    return log, cases, features, records


def test_candidates_come_from_the_basket_the_history_and_the_catalogue():
    log, cases, features, records = build(shop_events())
    ids = item_ids(log, SPEC)
    usable = [
        i
        for i in range(len(cases))
        if (cases.basket_slot[cases.basket_indptr[i] : cases.basket_indptr[i + 1]] >= 0).any()
    ]
    assert len(records) == len(usable) == count_records(cases, PrivacyUnit.EVENT)
    for row, case in enumerate(usable):
        lo, hi = cases.basket_indptr[case], cases.basket_indptr[case + 1]
        bought = set(ids[cases.basket_products[lo:hi], 0])
        history = set(ids[features.history_products(case), 0])
        target, product, in_history = (
            records.target[row, 0],
            records.items[row, 0, :, 0],
            records.features[row, 0, :, 0],
        )
        positives = product[target == POSITIVE]
        assert set(positives) <= bought and len(positives) == min(len(bought), 3)
        negatives = target == NEGATIVE
        from_history = negatives & (in_history == 1)
        assert set(product[from_history]) <= history - bought
        uniform = negatives & (in_history == 0)
        assert not set(product[uniform]) & (history | bought)
        assert (records.log_q[row, 0][target == POSITIVE] == 0).all()
        assert target[-1] in (NEGATIVE, PADDING)


def test_sampling_corrections_use_own_counts_and_catalogue_size():
    _, cases, features, records = build(shop_events())
    row = int(np.argmax((records.features[:, 0, :, 0] == 1).sum(1)))  # a long history
    target, in_history = records.target[row, 0], records.features[row, 0, :, 0]
    uniform = (target == NEGATIVE) & (in_history == 0)
    case = np.flatnonzero(
        [
            (cases.basket_slot[cases.basket_indptr[i] : cases.basket_indptr[i + 1]] >= 0).any()
            for i in range(len(cases))
        ]
    )[row]
    lo, hi = cases.basket_indptr[case], cases.basket_indptr[case + 1]
    bought = set(cases.basket_products[lo:hi])
    history = set(features.history_products(case))
    pool = len(cases.catalogue) - len(history | bought)
    assert records.log_q[row, 0][uniform] == pytest.approx(np.log(pool / RECORDS.uniform_negatives))
    from_history = (target == NEGATIVE) & (in_history == 1)
    unbought = len(history - bought)
    assert records.log_q[row, 0][from_history] == pytest.approx(
        np.log(unbought / from_history.sum())
    )


def test_customer_records_group_each_households_baskets():
    log, cases, _, records = build(shop_events(), PrivacyUnit.CUSTOMER)
    assert len(records) == count_records(cases, PrivacyUnit.CUSTOMER) == log.n_customers
    filled = (records.target == POSITIVE).any(-1).sum(1)
    assert (filled >= 1).all() and (filled <= RECORDS.baskets_per_customer).all()


def test_a_record_depends_on_its_own_household_only():
    frame = shop_events()
    _, _, _, full = build(frame)
    log = basket_log(frame)
    first = log.customer_ids[0]
    _, _, _, alone = build(frame[frame["customer_id"] == first])
    # the first household's records come first; with at most max_positives items per basket
    # the positives are the basket itself, so they and their features must agree whatever
    # the other households did
    n = len(alone)
    for row in range(n):
        mask_full = full.target[row, 0] == POSITIVE
        mask_alone = alone.target[row, 0] == POSITIVE
        assert (full.items[row, 0][mask_full] == alone.items[row, 0][mask_alone]).all()
        assert np.allclose(full.features[row, 0][mask_full], alone.features[row, 0][mask_alone])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_case_gets_the_candidates_its_own_sets_allow(seed):
    log = basket_log(shop_events(seed=seed, customers=20))
    cases = basket_cases(log, weeks=(1, 9), catalogue_weeks=(1, 6))  # some items unrankable
    features = history_features(log, cases)
    spec = RecordSpec(max_positives=2, history_negatives=3, uniform_negatives=4)
    got = basket_candidates(cases, features, spec, np.random.default_rng(seed))
    size = len(cases.catalogue)
    for i in range(len(cases)):
        slots = got.slots[got.indptr[i] : got.indptr[i + 1]]
        target = got.target[got.indptr[i] : got.indptr[i + 1]]
        log_q = got.log_q[got.indptr[i] : got.indptr[i + 1]]
        basket = cases.basket_slot[cases.basket_indptr[i] : cases.basket_indptr[i + 1]]
        bought = set(basket[basket >= 0].tolist())
        own = features.history_products(i)
        slot = np.searchsorted(cases.catalogue, own).clip(max=size - 1)
        history = set(slot[cases.catalogue[slot] == own].tolist())  # those still sold
        if not bought:
            assert len(slots) == 0
            continue
        positives = slots[target == POSITIVE]
        assert len(set(positives)) == len(positives) == min(len(bought), 2)
        assert set(positives) <= bought and (log_q[target == POSITIVE] == 0).all()
        negatives = slots[target == NEGATIVE]
        unbought = history - bought
        from_history = negatives[: min(3, len(unbought))]
        assert len(set(from_history)) == len(from_history) and set(from_history) <= unbought
        if from_history.size:
            assert np.allclose(
                log_q[target == NEGATIVE][: len(from_history)],
                np.log(len(unbought) / len(from_history)),
            )
        uniform = negatives[len(from_history) :]
        pool = size - len(history | bought)
        assert len(uniform) == (4 if pool > 0 else 0)
        assert not set(uniform.tolist()) & (history | bought)
        assert ((uniform >= 0) & (uniform < size)).all()
        if uniform.size:
            assert np.allclose(log_q[target == NEGATIVE][len(from_history) :], np.log(pool / 4))


def test_uniform_negatives_cover_the_rest_of_the_catalogue_evenly():
    log = basket_log(shop_events(seed=3))
    cases = basket_cases(log, weeks=(1, 9), catalogue_weeks=(1, 9))
    features = history_features(log, cases)
    case = int(np.argmax(np.diff(cases.basket_indptr)))
    one = cases.subset(np.full(4000, case))  # the same basket, drawn for 4,000 times
    spec = RecordSpec(max_positives=8, history_negatives=0, uniform_negatives=5)
    got = basket_candidates(one, history_features(log, one), spec, np.random.default_rng(0))
    drawn = got.slots[got.target == NEGATIVE]
    basket = cases.basket_slot[cases.basket_indptr[case] : cases.basket_indptr[case + 1]]
    history = np.searchsorted(cases.catalogue, features.history_products(case))
    excluded = set(basket[basket >= 0].tolist()) | set(history.tolist())
    allowed = sorted(set(range(len(cases.catalogue))) - excluded)
    counts = np.bincount(drawn, minlength=len(cases.catalogue))
    assert set(np.flatnonzero(counts).tolist()) == set(allowed)
    expected = len(drawn) / len(allowed)
    assert np.abs(counts[allowed] - expected).max() < 5 * np.sqrt(expected)
