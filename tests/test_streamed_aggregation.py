"""The platform's streamed aggregation: a running weighted sum, folded reply by reply, equals
the batch weighted mean exactly, whatever the arrival order, and holds no merchant's arrays;
a reply the acceptance policy rejects is never folded in."""

from __future__ import annotations

import dataclasses
import random
from fractions import Fraction

import numpy as np
import pytest

from client.app import app as client_app
from common import protocol as P
from common.errors import TrainingError
from common.ledger import ServerLedger
from server.federation import Federation, initial_model
from server.strategies import MerchantUpdate, RunningSum, weighted_average
from simulations.inprocess import InProcessGrid, simulation_grid
from simulations.runner import server_settings


def _updates(count: int, size: int, seed: int) -> list[MerchantUpdate]:
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(count):
        scale = 10.0 ** rng.integers(-30, 3, size)  # values across many binary orders
        values = (rng.standard_normal(size) * scale).astype(np.float32)
        weight = int(rng.integers(1, 100_000))
        updates.append(MerchantUpdate(f"m{i:03d}", {"w": values.reshape(2, -1)}, weight))
    return updates


def _exact_mean(updates: list[MerchantUpdate]) -> np.ndarray:
    """The oracle: rational arithmetic, rounded to float64 once, then to float32."""
    total = sum(u.num_examples for u in updates)
    flat = [u.arrays["w"].ravel() for u in updates]
    out = [
        float(
            sum(Fraction(float(v[j])) * u.num_examples for v, u in zip(flat, updates, strict=True))
        )
        / total
        for j in range(flat[0].size)
    ]
    return np.asarray(out, np.float64).astype(np.float32).reshape(2, -1)


def _batch_float64_mean(updates: list[MerchantUpdate]) -> np.ndarray:
    total = sum(u.num_examples for u in updates)
    acc = np.zeros(updates[0].arrays["w"].shape, np.float64)
    for update in sorted(updates, key=lambda u: u.merchant_id):
        acc += update.arrays["w"].astype(np.float64) * update.num_examples
    return (acc / total).astype(np.float32)


def test_streamed_sum_equals_the_exact_batch_mean_in_any_arrival_order() -> None:
    updates = _updates(40, 200, seed=1)
    expected = _exact_mean(updates)
    for order in range(5):
        arrived = list(updates)
        random.Random(order).shuffle(arrived)
        folded = RunningSum()
        for update in arrived:
            folded.add(update)
        mean = folded.mean()["w"]
        assert mean.dtype == np.float32 and mean.shape == (2, 100)
        np.testing.assert_array_equal(mean, expected)
    assert [c.merchant_id for c in folded] == sorted(u.merchant_id for u in updates)
    assert folded.total == sum(u.num_examples for u in updates) and len(folded) == 40


def test_streamed_sum_equals_the_float64_batch_mean_on_ordinary_weights() -> None:
    """Model-like values (one binary order of magnitude apart at most): the float64 batch
    mean has no rounding to lose, and the two agree bit for bit."""
    rng = np.random.default_rng(2)
    updates = [
        MerchantUpdate(f"m{i}", {"w": rng.uniform(0.5, 1.0, (4, 64)).astype(np.float32)}, 1 + i)
        for i in range(30)
    ]
    folded = RunningSum()
    for update in reversed(updates):
        folded.add(update)
    np.testing.assert_array_equal(folded.mean()["w"], _batch_float64_mean(updates))
    np.testing.assert_array_equal(folded.mean()["w"], weighted_average(updates)["w"])


def test_the_sum_holds_no_update_and_refuses_mismatched_ones() -> None:
    update = _updates(1, 8, seed=3)[0]
    folded = RunningSum()
    folded.add(update)
    update.arrays["w"][:] = 0.0  # the caller may drop or reuse its arrays once folded in
    np.testing.assert_array_equal(folded.mean()["w"], _updates(1, 8, seed=3)[0].arrays["w"])
    with pytest.raises(TrainingError, match="differ"):
        folded.add(MerchantUpdate("x", {"v": np.zeros((2, 4), np.float32)}, 1))
    with pytest.raises(TrainingError, match="shape"):
        folded.add(MerchantUpdate("x", {"w": np.zeros((4, 2), np.float32)}, 1))
    assert len(folded) == 1


class TamperingGrid(InProcessGrid):
    """Corrupts the update of one node (NaN) and remembers every reply's arrays."""

    def __init__(self, base: InProcessGrid, corrupt: int) -> None:
        super().__init__(base.client_app, [c.node_config for c in base.contexts.values()])
        self.corrupt = corrupt
        self.sent_arrays: dict[int, dict[str, np.ndarray]] = {}

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or P.ARRAYS not in reply.content:
                continue
            record = reply.content[P.ARRAYS]
            arrays = {k: v.numpy() for k, v in record.items()}
            if node == self.corrupt:
                first = sorted(arrays)[0]
                bad = arrays[first].copy()
                bad.flat[0] = np.nan
                from flwr.app import Array

                record[first] = Array(bad)
            else:
                self.sent_arrays[node] = arrays
        return replies


def test_a_rejected_reply_is_not_folded_in(small_layout) -> None:
    settings = server_settings(small_layout)
    settings = dataclasses.replace(settings, node_wait_s=0.0, max_in_flight=1)
    grid = TamperingGrid(simulation_grid(client_app, len(small_layout.merchant_ids())), 2)
    fed = Federation(grid, settings)
    arrays = initial_model(settings.config)
    with ServerLedger.open(settings.ledger_path) as ledger:
        outcome = fed.run_round(arrays, 1, ledger)
    bad = fed.name_of(2)
    assert bad in outcome.failed and "NaN" in outcome.failed[bad]
    assert [c.merchant_id for c in outcome.updates] == sorted(fed.name_of(n) for n in (1, 3))
    weights = {c.merchant_id: c.num_examples for c in outcome.updates}
    good = [
        MerchantUpdate(fed.name_of(n), a, weights[fed.name_of(n)])
        for n, a in grid.sent_arrays.items()
    ]
    expected = weighted_average(good)
    mean = outcome.updates.mean()
    assert sorted(mean) == sorted(expected)
    assert all(np.array_equal(mean[k], expected[k]) for k in mean)
