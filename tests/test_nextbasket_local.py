"""The merchant-local part: chosen on validation, never released, and kept across restarts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.nextbasket_local import HeldOut, fit_local_state, scores_with
from client.nextbasket_training import train_scorer
from client.training import LocalTraining
from common.accounting import PrivacyUnit
from common.errors import CheckpointError, ConfigError
from common.nextbasket.baskets import basket_cases, basket_log, heldout_cases
from common.nextbasket.features import history_features, merchant_popularity
from common.nextbasket.local import LocalHead, LocalState
from common.nextbasket.model import BasketScorer, RecordTensors, shared_arrays
from common.nextbasket.records import item_ids, training_records
from common.nextbasket.spec import RecordSpec, ScorerSpec
from tests.test_nextbasket_model import shop_events

SPEC = ScorerSpec(product_buckets=64, category_buckets=16, department_buckets=8, hidden_dim=8)


@pytest.fixture(scope="module")
def shop():
    log = basket_log(shop_events(seed=3, customers=16))
    items = item_ids(log, SPEC)
    train = basket_cases(log, weeks=(1, 8), catalogue_weeks=(1, 8))
    valid = heldout_cases(log, period=(9, 10), catalogue_weeks=(1, 8))
    popularity = merchant_popularity(log, before_week=9)[valid.catalogue]
    held = HeldOut(valid, history_features(log, valid), popularity, items)
    arrays = training_records(
        train,
        history_features(log, train),
        items,
        unit=PrivacyUnit.EVENT,
        spec=RecordSpec(max_positives=4, history_negatives=4, uniform_negatives=4),
        rng=np.random.default_rng(0),
    )
    return RecordTensors.of(arrays), held


def shared_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return shared_arrays(BasketScorer(SPEC))


def test_fitting_the_local_part_leaves_the_shared_weights_alone(shop):
    records, held = shop
    shared = shared_weights()
    before = {k: v.copy() for k, v in shared.items()}
    state = fit_local_state(
        merchant_id="shop",
        shared=shared,
        spec=SPEC,
        records=records,
        validation=held,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(np.array_equal(shared[k], before[k]) for k in before)
    scores = scores_with(state, shared, SPEC, held)
    assert scores.shape == (len(held.cases), len(held.cases.catalogue))


def test_the_released_weights_do_not_depend_on_the_local_part(shop):
    """One-way coupling: a round trained after fitting a local state releases exactly what
    it releases without one, and only shared parameter names."""
    records, held = shop
    settings = LocalTraining(batch_size=16, local_epochs=1, learning_rate=1e-2)

    def release() -> dict[str, np.ndarray]:
        model = BasketScorer(SPEC)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in shared_weights().items()})
        result = train_scorer(
            model=model,
            records=records,
            settings=settings,
            dp=None,
            sampling_generator=torch.Generator().manual_seed(5),
            noise_generator=torch.Generator().manual_seed(6),
        )
        return result.arrays

    plain = release()
    state = fit_local_state(
        merchant_id="shop",
        shared=shared_weights(),
        spec=SPEC,
        records=records,
        validation=held,
        generator=torch.Generator().manual_seed(0),
    )
    after = release()
    assert set(after) == set(shared_weights())
    assert all(np.array_equal(plain[k], after[k]) for k in plain)
    assert state.merchant_id == "shop"


def test_local_state_survives_a_restart(tmp_path):
    personal = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    state = LocalState("store-1", LocalHead(0.25), 0.1, personal)
    path = tmp_path / "local" / "state.npz"
    state.save(path)
    loaded = LocalState.load(path, merchant_id="store-1")
    assert loaded.head == state.head and loaded.prox == 0.1
    assert set(loaded.personal) == {"a", "b"}
    assert all(np.array_equal(loaded.personal[k], personal[k]) for k in personal)
    blend_only = LocalState("store-1", LocalHead(0.5))
    blend_only.save(path)  # replaces the file whole
    assert LocalState.load(path, merchant_id="store-1") == blend_only


def test_local_state_refuses_another_merchant_or_garbage(tmp_path):
    path = tmp_path / "state.npz"
    LocalState("store-1", LocalHead(0.1)).save(path)
    with pytest.raises(CheckpointError, match="store-1"):
        LocalState.load(path, merchant_id="store-2")
    path.write_bytes(b"not an archive")
    with pytest.raises(CheckpointError, match="not a readable local state"):
        LocalState.load(path, merchant_id="store-1")


def test_personal_weights_need_a_strength():
    with pytest.raises(ConfigError):
        LocalState("m", LocalHead(), None, {"a": np.zeros(1, np.float32)})
    with pytest.raises(ConfigError):
        LocalHead(float("nan"))
