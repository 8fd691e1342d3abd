"""The DP guarantee against the platform: the merchant's randomness is its own, and clipping
bounds what one record can do to a round's update."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pytest
import torch

from client.dp_randomness import MerchantSecret, load_merchant_secret, secret_path
from client.merchant_data import training_data
from client.merchant_round import RoundPlan, _train, run_merchant_round
from client.nextbasket_training import train_scorer
from client.training import DPSettings, LocalTraining
from common.accounting import AccountantKind, MechanismStep
from common.arrays_io import arrays_sha256
from common.config import OptimizerKind, RunConfig
from common.keys import load_signing_key
from common.ledger import LedgerEntry, MerchantLedger
from common.nextbasket.model import BasketScorer, RecordTensors, shared_arrays
from common.nextbasket.records import POSITIVE, RecordArrays
from common.nextbasket.spec import ScorerSpec
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
    data = training_data(merchant.data, request.config.model)
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

SPEC = ScorerSpec(
    product_buckets=64, category_buckets=8, department_buckets=4, embedding_dim=4, hidden_dim=8
)


def _records(seed: int, n: int) -> RecordTensors:
    """``n`` records of one basket each: 2 positives and 6 negatives over random products."""
    rng = np.random.default_rng(seed)
    candidates = 8
    target = np.zeros((n, 1, candidates), dtype=np.int8)
    target[..., :2] = POSITIVE
    return RecordTensors.of(
        RecordArrays(
            features=rng.normal(size=(n, 1, candidates, SPEC.features)).astype(np.float32),
            items=np.stack(
                [rng.integers(1, b, size=(n, 1, candidates)) for b in (64, 8, 4)], axis=-1
            ),
            log_q=np.zeros((n, 1, candidates), dtype=np.float32),
            target=target,
        )
    )


def _one_step(records: RecordTensors, *, clipping_norm: float, lr: float) -> dict:
    torch.manual_seed(0)
    model = BasketScorer(SPEC)
    train_scorer(
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
    return dict(shared_arrays(model))


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
    extreme = RecordTensors(extreme.features * 50, extreme.items, extreme.log_q, extreme.target)
    neighbour = RecordTensors(
        *[torch.cat([e, t[1:]]) for t, e in zip(base.tensors(), extreme.tensors(), strict=True)]
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
