"""The DP guarantee against the platform: the merchant's randomness is its own, and clipping
bounds what one record can do to a round's update."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pytest
import torch

from client.data import prepared_data
from client.dp_randomness import MerchantSecret, load_merchant_secret, secret_path
from client.merchant_round import RoundPlan, _train, run_merchant_round
from client.training import DPSettings, LocalTraining, train_round
from common.accounting import AccountantKind, MechanismStep
from common.config import OptimizerKind, RunConfig
from common.features import RecordTensors
from common.keys import load_signing_key
from common.ledger import LedgerEntry, MerchantLedger
from common.model import ModelSpec, Recommender, arrays_sha256, state_arrays
from common.protocol import Outcome, TrainInstruction
from common.rng import numpy_stream, torch_stream
from server.federation import initial_model


def _instruction(layout, rnd=1, arrays=None):
    config = RunConfig.from_toml(layout.config)
    arrays = arrays if arrays is not None else initial_model(config)
    return TrainInstruction(
        run_id="run-x",
        round=rnd,
        planned_rounds=config.federation.rounds,
        config=config,
        arrays=arrays,
        model_in_sha256=arrays_sha256(arrays),
    )


def _twin(layout, tmp_path, name):
    """The first merchant's data, id and key, but a state directory (and secret) of its own."""
    merchant = layout.merchant_config(layout.merchant_ids()[0])
    twin = dataclasses.replace(merchant, state_dir=tmp_path / name)
    return merchant, twin


def _entry(merchant) -> LedgerEntry:
    with MerchantLedger.open(
        merchant.ledger_path,
        merchant_id=merchant.id,
        signing_key=load_signing_key(merchant.signing_key),
    ) as ledger:
        return ledger.entries()[-1]


def test_same_data_same_request_different_secrets_release_different_weights(small_layout, tmp_path):
    merchant, twin = _twin(small_layout, tmp_path, "twin")
    request = _instruction(small_layout)
    a = run_merchant_round(request, merchant)
    b = run_merchant_round(request, twin)
    assert a.outcome is b.outcome is Outcome.TRAINED
    assert a.metrics["epsilon"] == b.metrics["epsilon"]  # same mechanism, same epsilon
    assert a.metrics["noise-multiplier"] == b.metrics["noise-multiplier"]
    assert arrays_sha256(a.arrays) != arrays_sha256(b.arrays)


class _PublicStreams:
    """The platform's best guess: streams derived from a value it holds, the old public way."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def numpy_stream(self, *path):
        return numpy_stream(self.seed, *path)

    def torch_stream(self, *path, device="cpu"):
        return torch_stream(self.seed, *path, device=device)


def _plan(entry: LedgerEntry) -> RoundPlan:
    r = entry.release
    return RoundPlan(
        mechanism=MechanismStep(r.noise_multiplier, r.sample_rate, r.steps),
        delta=r.delta,
        cap=r.epsilon_cap,
        accountant=AccountantKind(r.accountant.value),
        epsilon_after=r.epsilon_after,
        epsilon_rdp=r.epsilon_rdp,
        records=r.dataset_size,
    )


def test_platform_cannot_replay_a_release_and_the_merchant_can(small_layout, tmp_path):
    """Everything the platform holds (run config and seed, input model, ledger entry, the
    reply), and even the merchant's data, does not reproduce the release; the merchant's own
    secret does, bit for bit."""
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    request = _instruction(small_layout)
    reply = run_merchant_round(request, merchant)
    entry = _entry(merchant)
    released = arrays_sha256(reply.arrays)
    data = prepared_data(merchant.data, request.config.model)
    plan = _plan(entry)

    def replay(streams) -> str:
        return arrays_sha256(_train(request, merchant, data, plan, streams).arrays)

    platform_values = [
        request.config.seed,
        int(request.model_in_sha256[:15], 16),
        int(entry.entry_hash[:15], 16),
        int(hashlib.sha256(request.run_id.encode()).hexdigest()[:15], 16),
    ]
    for value in platform_values:
        assert replay(_PublicStreams(value)) != released
        key = hashlib.sha256(str(value).encode()).digest()
        assert replay(MerchantSecret(key)) != released
    assert replay(load_merchant_secret(merchant.state_dir)) == released  # the merchant can


def test_a_restored_merchant_reproduces_its_release(small_layout, tmp_path):
    merchant, twin = _twin(small_layout, tmp_path, "restored")
    twin.state_dir.mkdir()
    shutil.copy2(secret_path(merchant.state_dir), secret_path(twin.state_dir))
    request = _instruction(small_layout)
    assert arrays_sha256(run_merchant_round(request, merchant).arrays) == arrays_sha256(
        run_merchant_round(request, twin).arrays
    )


# -- clipping ------------------------------------------------------------------------------

SPEC = ModelSpec(
    product_buckets=64,
    category_buckets=8,
    department_buckets=4,
    embedding_dim=4,
    hidden_dim=8,
    history_length=3,
)


def _records(seed: int, n: int) -> RecordTensors:
    rng = np.random.default_rng(seed)

    def ids(high, *shape):
        return torch.from_numpy(rng.integers(1, high, size=shape))

    return RecordTensors(
        history=ids(64, n, 1, 3),
        items=ids(64, n, 1, 5),
        categories=ids(8, n, 1, 5),
        departments=ids(4, n, 1, 5),
        mask=torch.ones((n, 1), dtype=torch.float32),
    )


def _one_step(records: RecordTensors, *, clipping_norm: float, lr: float) -> dict:
    torch.manual_seed(0)
    model = Recommender(SPEC)
    train_round(
        model=model,
        records=records,
        settings=LocalTraining(
            batch_size=len(records),  # q = 1: one step over every record
            local_epochs=1,
            learning_rate=lr,
            optimizer=OptimizerKind.SGD,
            momentum=0.0,
        ),
        dp=DPSettings(noise_multiplier=0.0, clipping_norm=clipping_norm),
        sampling_generator=torch.Generator().manual_seed(1),
        noise_generator=torch.Generator().manual_seed(2),
    )
    return state_arrays(model)


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


@pytest.mark.parametrize("clipping_norm", [1e-3, 0.05])
def test_one_record_moves_a_step_by_at_most_lr_times_2c_over_b(clipping_norm):
    """Neighbouring datasets (one record replaced by an extreme one): with sigma = 0 the
    steps differ by at most lr x 2C / B. Without effective clipping they differ by far more,
    so the bound is what clipping buys."""
    n, lr = 32, 0.5
    base = _records(0, n)
    extreme = _records(99, 1)
    neighbour = RecordTensors(
        *[
            torch.cat([t[:1] * 0 + e, t[1:]])
            for t, e in zip(base.tensors(), extreme.tensors(), strict=True)
        ]
    )
    bound = lr * 2 * clipping_norm / n
    clipped = _distance(
        _one_step(base, clipping_norm=clipping_norm, lr=lr),
        _one_step(neighbour, clipping_norm=clipping_norm, lr=lr),
    )
    assert 0 < clipped <= bound * (1 + 1e-4)
    unclipped = _distance(
        _one_step(base, clipping_norm=1e6, lr=lr), _one_step(neighbour, clipping_norm=1e6, lr=lr)
    )
    assert unclipped > 5 * bound
