"""Full-catalogue scoring at the merchant: serving ranks exactly as the federated evaluation does.

The contract: for a household, the merchant's events up to a moment, a model version and the
merchant's local part, serving's top-K is the K best of the scores client/evaluation.py computes
for the same household at that moment (ties in catalogue order), with the shared weights alone
and with the local part.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from client.evaluation import local_state_path, offline_parts
from client.merchant import MerchantConfig
from client.nextbasket_local import scores_with
from client.serving.scorer import NextBasketScorer, ServingEvents, best_k_by, load_local_state
from common.arrays_io import arrays_sha256
from common.config import RunConfig
from common.errors import ConfigError
from common.events import REQUIRED_COLUMNS, write_events
from common.nextbasket.baselines import break_ties
from common.nextbasket.local import LocalHead, LocalState
from common.nextbasket.spec import MODEL_KIND, describe, spec_of
from common.protocol import EvalPart
from common.publication import ModelDescriptor
from common.synthetic import SyntheticSpec, generate_events

sys.path.insert(0, str(Path(__file__).parent / "support"))
from serving_world import SPEC, random_arrays


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[MerchantConfig, object]:
    """One synthetic merchant: weeks 1-40 are its data, weeks 41-53 its test part."""
    root = tmp_path_factory.mktemp("shop")
    events = generate_events(
        SyntheticSpec(
            n_merchants=1,
            customers_per_merchant=80,
            n_products=300,
            events_per_merchant=5000,
            seed=11,
        )
    )
    train, test = events[events["week"] <= 40], events[events["week"] > 40]
    for i, customer in enumerate(test["customer_id"].unique()[:3]):  # households new in the test
        newcomer = test[test["customer_id"] == customer].assign(customer_id=f"newcomer-{i}")
        test = pd.concat([test, newcomer], ignore_index=True)
    write_events(train[list(REQUIRED_COLUMNS)], root / "train.parquet")
    write_events(test[list(REQUIRED_COLUMNS)], root / "test.parquet")
    merchant = MerchantConfig(
        id=str(events["merchant_id"].iloc[0]),
        data=root / "train.parquet",
        test_data=root / "test.parquet",
        state_dir=root / "state",
        signing_key=root / "unused.key",
    )
    return merchant, train[list(REQUIRED_COLUMNS)]


def evaluation_cases(merchant: MerchantConfig):  # type: ignore[no-untyped-def]
    config = RunConfig(model=SPEC)
    part = offline_parts(merchant, {EvalPart.TEST}, config)[EvalPart.TEST]
    return part.heldout, part.periods.log


def personal_state(merchant_id: str, shared: dict[str, np.ndarray]) -> LocalState:
    return LocalState(
        merchant_id,
        LocalHead(0.25),
        prox=0.1,
        personal=random_arrays(99),
        shared_sha256=arrays_sha256(shared),
    )


@pytest.mark.parametrize("local", ["none", "blend", "neighbours", "personal"])
def test_serving_ranks_a_household_exactly_as_the_evaluation(shop, local: str) -> None:
    merchant, train = shop
    shared = random_arrays(1)
    state = {
        "none": LocalState(merchant.id),
        "blend": LocalState(merchant.id, LocalHead(0.5)),
        "neighbours": LocalState(merchant.id, LocalHead(0.1, 4.0)),
        "personal": personal_state(merchant.id, shared),
    }[local]
    held, log = evaluation_cases(merchant)
    expected = scores_with(state, shared, SPEC, held)  # what client/evaluation.py ranks by

    scorer = NextBasketScorer(7, SPEC, shared, state, ServingEvents.of(train, SPEC))
    assert scorer.personal == (local == "personal")
    catalogue_ids = log.product_ids[held.cases.catalogue]
    np.testing.assert_array_equal(scorer.events.product_ids, catalogue_ids)
    cold = 0
    for i in range(len(held.cases)):
        customer = str(log.customer_ids[held.cases.customer[i]])
        at = float(held.cases.day[i])  # the evaluation's scoring moment: the household's visit
        final, _, _ = scorer.final_scores([customer], at=at)
        np.testing.assert_array_equal(final[0], expected[i])
        top = scorer.top_k([customer], len(catalogue_ids), at=at)
        order = np.lexsort((np.arange(len(catalogue_ids)), -expected[i]))
        assert list(top.products[0]) == list(catalogue_ids[order])
        assert list(scorer.top_k([customer], 10, at=at).products[0]) == list(
            catalogue_ids[order[:10]]
        )
        has_history = held.cases.history_end[i] > held.cases.history_start[i]
        assert bool(top.known[0]) == bool(has_history)
        cold += not has_history
    assert 0 < cold < len(held.cases)  # both kinds of household were compared


def test_personal_weights_serve_only_the_version_they_were_fitted_from(shop) -> None:
    merchant, train = shop
    shared, newer = random_arrays(1), random_arrays(2)
    state = personal_state(merchant.id, shared)
    events = ServingEvents.of(train, SPEC)
    customers = sorted(events.customer_codes)[:5]
    fitted = NextBasketScorer(1, SPEC, shared, state, events)
    later = NextBasketScorer(2, SPEC, newer, state, events)
    blend_only = NextBasketScorer(2, SPEC, newer, LocalState(merchant.id, state.head), events)
    assert fitted.personal and not later.personal
    np.testing.assert_array_equal(
        later.final_scores(customers)[0], blend_only.final_scores(customers)[0]
    )
    personal_only = NextBasketScorer(1, SPEC, state.personal, LocalState(merchant.id), events)
    np.testing.assert_allclose(  # the personal scores, blended
        fitted.final_scores(customers)[1] - 0.25 * np.log1p(events.popularity),
        personal_only.final_scores(customers)[1],
        rtol=0,
        atol=1e-12,
    )


def test_the_kept_local_part_is_read_from_the_state_directory(shop, tmp_path: Path) -> None:
    merchant, _ = shop
    merchant = dataclasses.replace(merchant, state_dir=tmp_path / "state")
    assert load_local_state(merchant) == LocalState(merchant.id)  # none yet: shared only
    state = personal_state(merchant.id, random_arrays(1))
    state.save(local_state_path(merchant))
    loaded = load_local_state(merchant)
    assert loaded.head == state.head and loaded.shared_sha256 == state.shared_sha256
    local_state_path(merchant).write_bytes(b"garbage")
    assert load_local_state(merchant) == LocalState(merchant.id)  # unreadable: shared only


def test_top_k_is_sorted_with_ties_in_catalogue_order_and_cold_start_is_not_an_error(
    shop,
) -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    np.testing.assert_array_equal(best_k_by(scores, np.zeros(5), 3), [[1, 4, 0], [0, 1, 2]])
    sales = np.array([0.0, 1.0, 5.0, 0.0, 2.0])  # ties go to the better seller first
    np.testing.assert_array_equal(best_k_by(scores, sales, 3), [[4, 1, 2], [2, 4, 1]])
    assert best_k_by(scores, sales, 99).shape == (2, 5)
    assert best_k_by(scores, sales, 0).shape == (2, 0)

    merchant, train = shop
    events = ServingEvents.of(train, SPEC)
    scorer = NextBasketScorer(1, SPEC, random_arrays(2), LocalState(merchant.id), events)
    known = sorted(events.customer_codes)[:2]
    top = scorer.top_k([known[0], "nobody", known[1]], 7)
    assert top.products.shape == (3, 7) and list(top.known) == [True, False, True]
    assert all(np.all(np.diff(row) <= 0) for row in top.scores)
    assert set(top.products.reshape(-1)) <= set(train["product_id"])
    cold = scorer.top_k(["nobody", "someone else"], 7)
    np.testing.assert_array_equal(cold.products[0], cold.products[1])  # non-personal ranking
    assert not np.array_equal(top.products[0], top.products[2])  # histories matter


@given(
    scores=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(1, 30)),
        elements=st.integers(0, 4).map(float),
    ),
    data=st.data(),
)
def test_best_k_by_is_the_head_of_the_tie_broken_ranking(scores, data) -> None:
    n = scores.shape[1]
    tie = np.asarray(data.draw(hnp.arrays(np.float64, n, elements=st.integers(0, 3).map(float))))
    k = data.draw(st.integers(0, n + 2))
    final = break_ties(scores, tie)
    for row, top in zip(final, best_k_by(scores, tie, k), strict=True):
        assert list(top) == list(np.lexsort((np.arange(n), -row))[:k])


def test_the_publication_names_the_scorer_and_its_shape(shop) -> None:
    merchant, train = shop
    assert spec_of(describe(SPEC), version_id=4) == SPEC
    with pytest.raises(ConfigError, match="cannot be served"):
        spec_of(ModelDescriptor("fedshop-recommender/1", {}), version_id=4)
    with pytest.raises(ConfigError, match="not valid"):
        spec_of(ModelDescriptor(MODEL_KIND, {"colour": 3}), version_id=4)
    wider = dataclasses.replace(SPEC, hidden_dim=8)
    events = ServingEvents.of(train, wider)
    with pytest.raises(ConfigError, match="shape"):
        NextBasketScorer(4, wider, random_arrays(1), LocalState(merchant.id), events)


def test_scoring_is_deterministic_across_calls_and_batches(shop) -> None:
    merchant, train = shop
    events = ServingEvents.of(train, SPEC)
    scorer = NextBasketScorer(1, SPEC, random_arrays(3), LocalState(merchant.id), events)
    customers = [*sorted(events.customer_codes)[:20], "new"]
    together = scorer.top_k(customers, 10)
    torch.set_num_threads(1)
    for j, customer in enumerate(customers):
        alone = scorer.top_k([customer], 10)
        np.testing.assert_array_equal(alone.products[0], together.products[j])
