"""The next-basket scorer: shapes, the loss, per-record clipping norms, and one DP-SGD round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from client.clipped_gradients import clipped_gradient_sum
from client.nextbasket_training import personalise, train_scorer
from client.training import DPSettings, LocalTraining
from common.accounting import PrivacyUnit
from common.config import OptimizerKind
from common.nextbasket.baskets import basket_cases, basket_log, heldout_cases
from common.nextbasket.features import FEATURES, history_features
from common.nextbasket.model import (
    BasketScorer,
    BasketSoftmaxLoss,
    RecordTensors,
    catalogue_groups,
    catalogue_terms,
    load_shared_arrays,
    score_catalogue,
    shared_arrays,
)
from common.nextbasket.records import item_ids, training_records
from common.nextbasket.spec import RecordSpec, ScorerSpec

SPEC = ScorerSpec(product_buckets=64, category_buckets=16, department_buckets=8, hidden_dim=8)
RECORDS = RecordSpec(max_positives=4, history_negatives=4, uniform_negatives=4)


def shop_events(seed: int = 0, customers: int = 12, weeks: int = 12) -> pd.DataFrame:
    """A small shop: each customer visits weekly and buys a few of 30 products."""
    rng = np.random.default_rng(seed)
    rows = []
    origin = pd.Timestamp("2024-01-01", tz="UTC")
    for c in range(customers):
        favourites = rng.choice(30, 5, replace=False)
        for w in range(weeks):
            if rng.random() < 0.3:
                continue
            bought = set(rng.choice(favourites, 2, replace=False)) | {int(rng.integers(30))}
            for p in bought:
                rows.append(
                    {
                        "merchant_id": "shop",
                        "customer_id": f"c{c}",
                        "product_id": f"p{p}",
                        "timestamp": origin + pd.Timedelta(days=7 * w + c % 5, hours=9),
                        "category": f"cat{p % 6}",
                        "department": f"dep{p % 3}",
                        "week": w + 1,
                    }
                )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def shop():
    log = basket_log(shop_events())
    train = basket_cases(log, weeks=(1, 9), catalogue_weeks=(1, 9))
    test = heldout_cases(log, period=(10, 12), catalogue_weeks=(1, 9))
    return log, train, history_features(log, train), test, history_features(log, test)


def records_of(shop, unit: PrivacyUnit = PrivacyUnit.EVENT) -> RecordTensors:
    log, train, features, _, _ = shop
    arrays = training_records(
        train, features, item_ids(log, SPEC), unit=unit, spec=RECORDS, rng=np.random.default_rng(0)
    )
    return RecordTensors.of(arrays)


def test_forward_and_full_catalogue_shapes(shop):
    log, _, _, test, test_features = shop
    records = records_of(shop)
    model = BasketScorer(SPEC)
    logits = model(records.features[:3], records.items[:3])
    assert logits.shape == (3, RECORDS.candidates)
    scores = score_catalogue(model, test_features, test, item_ids(log, SPEC), batch_cases=2)
    assert scores.shape == (len(test), len(test.catalogue))
    assert np.isfinite(scores).all()


def dense_scores(model, features, cases, items) -> np.ndarray:
    """The forward pass over every (case, catalogue product) pair, features looked up one by
    one: what score_catalogue must equal."""
    size = len(cases.catalogue)
    rows = np.arange(len(cases))
    x = features.lookup(np.repeat(rows, size), np.tile(cases.catalogue, len(rows)))
    ids = torch.from_numpy(items[cases.catalogue]).unsqueeze(0).expand(len(rows), -1, -1)
    with torch.no_grad():
        return model(torch.from_numpy(x.reshape(len(rows), size, -1)), ids).numpy()


@pytest.mark.parametrize("batch_cases", [1, 3, 256])
def test_grouped_full_ranking_equals_the_forward_pass_over_every_product(shop, batch_cases):
    log, _, _, test, _ = shop
    # every other case without history: cold-start rows beside rows with a repeat term
    cut = test.history_end.copy()
    cut[::2] = test.history_start[::2]
    cases = dataclasses.replace(test, history_end=cut)
    features = history_features(log, cases)
    items = item_ids(log, SPEC)
    model = BasketScorer(SPEC)
    torch.manual_seed(3)
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.5)
    fast = score_catalogue(model, features, cases, items, batch_cases=batch_cases)
    np.testing.assert_allclose(fast, dense_scores(model, features, cases, items), atol=2e-6)
    # both kinds of product are present: in some history and in none
    in_history = np.isin(test.catalogue, features.pair_product())
    assert in_history.any() and not in_history.all()


def test_kept_catalogue_terms_give_the_same_scores_and_must_fit_the_catalogue(shop):
    log, _, _, test, features = shop
    items = item_ids(log, SPEC)
    model = BasketScorer(SPEC)
    shop_codes = np.asarray(test.catalogue)
    groups = catalogue_groups(
        features.product_category, features.product_department, shop_codes, items
    )
    terms = catalogue_terms(model, shop_codes, items, groups)
    kept = score_catalogue(model, features, test, items, groups=groups, terms=terms)
    np.testing.assert_array_equal(kept, score_catalogue(model, features, test, items))
    smaller = shop_codes[:-1]
    other = catalogue_terms(
        model,
        smaller,
        items,
        catalogue_groups(features.product_category, features.product_department, smaller, items),
    )
    with pytest.raises(ValueError, match="another catalogue"):
        score_catalogue(model, features, test, items, groups=groups, terms=other)


def test_customer_records_hold_several_baskets(shop):
    records = records_of(shop, PrivacyUnit.CUSTOMER)
    assert records.features.shape[1:] == (
        RECORDS.baskets_per_customer * RECORDS.candidates,
        len(FEATURES),
    )
    assert records.target.shape[1:] == (RECORDS.baskets_per_customer, RECORDS.candidates)


def test_loss_matches_a_hand_computed_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0]])
    log_q = torch.tensor([[[0.0, 0.0, np.log(3.0), 0.0]]])
    target = torch.tensor([[[1, 0, 0, -1]]])
    loss = BasketSoftmaxLoss()(logits, log_q, target)
    # positive 2.0 against negatives 1.0 and 0.0 + log 3; padding ignored
    expected = -np.log(np.exp(2.0) / (np.exp(2.0) + np.exp(1.0) + 3.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_loss_of_a_record_without_negatives_is_zero_with_finite_gradients():
    logits = torch.zeros((1, 3), requires_grad=True)
    loss = BasketSoftmaxLoss()(logits, torch.zeros((1, 1, 3)), torch.tensor([[[1, -1, -1]]]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(logits.grad).all()


def _brute_force_norms(model: torch.nn.Module, records: RecordTensors) -> torch.Tensor:
    criterion = BasketSoftmaxLoss()
    norms = []
    for i in range(len(records)):
        model.zero_grad()
        f, x, q, t = (tensor[i : i + 1] for tensor in records.tensors())
        criterion(model(f, x), q, t).backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        norms.append(torch.cat(grads).norm())
    return torch.stack(norms)


def test_one_pass_clipping_norms_equal_per_record_autograd_on_customer_records(shop):
    records = records_of(shop, PrivacyUnit.CUSTOMER)
    torch.manual_seed(0)
    model = BasketScorer(SPEC)
    with torch.no_grad():
        model.product_bias.weight.normal_()
    expected = _brute_force_norms(model, records)
    criterion = BasketSoftmaxLoss()
    criterion.reduction = "none"
    step = clipped_gradient_sum(
        model,
        lambda m: criterion(m(records.features, records.items), records.log_q, records.target),
        max_grad_norm=1.0,
    )
    assert torch.allclose(step.norms, expected, rtol=1e-4, atol=1e-6)


def test_one_dp_sgd_round(shop):
    records = records_of(shop)
    model = BasketScorer(SPEC)
    before = shared_arrays(model)
    result = train_scorer(
        model=model,
        records=records,
        settings=LocalTraining(
            batch_size=16, local_epochs=1, optimizer=OptimizerKind.SGD, learning_rate=0.5
        ),
        dp=DPSettings(noise_multiplier=1.0, clipping_norm=1.0),
        sampling_generator=torch.Generator().manual_seed(1),
        noise_generator=torch.Generator().manual_seed(2),
    )
    assert set(result.arrays) == set(before)
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in result.arrays.values())
    assert any(not np.array_equal(result.arrays[k], before[k]) for k in before)
    assert result.mechanism is not None
    assert result.mechanism.steps == -(-len(records) // 16)
    fresh = BasketScorer(SPEC)
    load_shared_arrays(fresh, result.arrays)
    assert all(np.array_equal(v, result.arrays[k]) for k, v in shared_arrays(fresh).items())


def test_personal_weights_move_less_with_a_stronger_pull(shop):
    records = records_of(shop)
    shared = shared_arrays(BasketScorer(SPEC))
    settings = LocalTraining(batch_size=16, local_epochs=2, learning_rate=1e-2)

    def distance(prox: float) -> float:
        model = BasketScorer(SPEC)
        load_shared_arrays(model, shared)
        personal = personalise(
            model=model,
            records=records,
            settings=settings,
            prox=prox,
            generator=torch.Generator().manual_seed(0),
        )
        return sum(float(np.sum((personal[k] - shared[k]) ** 2)) for k in shared)

    assert distance(100.0) < distance(0.0)
