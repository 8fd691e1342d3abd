"""The merchant's privacy contract, without Flower: budget refusal, ledger before release,
idempotent re-send, and epsilon that survives restarts."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

import client.merchant_data
from client.dp_randomness import secret_path
from client.merchant_round import run_merchant_round
from common.accounting import MechanismStep, epsilon_spent
from common.arrays_io import arrays_sha256
from common.config import RunConfig
from common.keys import load_signing_key
from common.ledger import MerchantLedger
from common.protocol import Outcome, RefusalCode, TrainInstruction
from server.federation import initial_model


def request(layout, rnd, arrays=None, run_id="run-a", config=None, server_seq=-1):
    config = config or RunConfig.from_toml(layout.config)
    arrays = arrays if arrays is not None else initial_model(config)
    return TrainInstruction(
        run_id=run_id,
        round=rnd,
        planned_rounds=config.federation.rounds,
        config=config,
        arrays=arrays,
        model_in_sha256=arrays_sha256(arrays),
        server_ledger_seq=server_seq,
    )


def entries(merchant):
    with MerchantLedger.open(
        merchant.ledger_path,
        merchant_id=merchant.id,
        signing_key=load_signing_key(merchant.signing_key),
    ) as ledger:
        return ledger.entries()


def test_rounds_record_then_release_and_compose(small_layout):
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    first = run_merchant_round(request(small_layout, 1), merchant)
    assert first.outcome is Outcome.TRAINED and first.arrays is not None
    second = run_merchant_round(request(small_layout, 2, first.arrays), merchant)
    log = entries(merchant)
    assert [e.release.round for e in log] == [1, 2]
    assert log[1].release.model_out_sha256 == arrays_sha256(second.arrays)
    history = [
        MechanismStep(e.release.noise_multiplier, e.release.sample_rate, e.release.steps)
        for e in log
    ]
    assert second.metrics["epsilon"] == pytest.approx(
        epsilon_spent(history, delta=log[1].release.delta)
    )
    assert log[1].release.epsilon_rdp > log[1].release.epsilon_after  # PLD is the tighter one
    assert log[1].release.noise_source == "merchant-secret"
    assert second.metrics["epsilon"] <= RunConfig.from_toml(small_layout.config).privacy.epsilon_cap


def test_restored_state_gives_identical_epsilon_and_weights(small_layout, tmp_path):
    """Rounds 1-3 in one go == rounds 1-2, a restart (caches dropped, ledger reopened), round 3,
    by a merchant whose state directory (with its DP secret) was restored from backup."""
    ids = small_layout.merchant_ids()
    merchant = small_layout.merchant_config(ids[0])
    other = dataclasses.replace(
        small_layout.merchant_config(ids[1]),
        data=merchant.data,
        signing_key=merchant.signing_key,
        id=merchant.id,
        state_dir=tmp_path / "other-state",
    )
    other.state_dir.mkdir()
    shutil.copy2(secret_path(merchant.state_dir), secret_path(other.state_dir))
    replies = {}
    for who in (merchant, other):
        arrays = None
        for rnd in (1, 2, 3):
            if who is other and rnd == 3:
                client.merchant_data._CACHE.clear()
                client.merchant_data._TRAINING.clear()  # a new process starts empty
            reply = run_merchant_round(request(small_layout, rnd, arrays), who)
            arrays = reply.arrays
        replies[who.state_dir] = reply
    a, b = replies[merchant.state_dir], replies[other.state_dir]
    assert a.metrics["epsilon"] == b.metrics["epsilon"]
    assert arrays_sha256(a.arrays) == arrays_sha256(b.arrays)


def test_refusal_releases_nothing_and_writes_nothing(small_layout):
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    merchant = dataclasses.replace(merchant, epsilon_cap=0.01)
    config = RunConfig.from_toml(small_layout.config)
    config = dataclasses.replace(
        config, privacy=dataclasses.replace(config.privacy, noise_multiplier=0.5)
    )
    reply = run_merchant_round(request(small_layout, 1, config=config), merchant)
    assert reply.outcome is Outcome.REFUSED and reply.arrays is None and reply.ledger_entry is None
    assert "cap" in reply.reason and entries(merchant) == []
    assert reply.code == RefusalCode.BUDGET.value
    assert not merchant.outbox.exists() or not any(merchant.outbox.iterdir())


def test_budget_exhausted_across_runs_is_refused(small_layout):
    """A second run cannot spend what the first one already spent (the ledger persists): with
    the budget nearly used up, a round needs more noise than the merchant accepts."""
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    merchant = dataclasses.replace(merchant, max_noise_multiplier=3.0)
    arrays = None
    for rnd in (1, 2, 3):
        reply = run_merchant_round(request(small_layout, rnd, arrays), merchant)
        assert reply.outcome is Outcome.TRAINED
        arrays = reply.arrays
    fresh = run_merchant_round(request(small_layout, 1, run_id="run-b"), merchant)
    assert fresh.outcome is Outcome.REFUSED and fresh.arrays is None
    assert len(entries(merchant)) == 3


def test_same_round_asked_twice_is_resent_not_respent(small_layout):
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    first = run_merchant_round(request(small_layout, 1), merchant)
    again = run_merchant_round(request(small_layout, 1), merchant)
    assert again.outcome is Outcome.TRAINED and again.reason == "re-sent"
    assert arrays_sha256(again.arrays) == arrays_sha256(first.arrays)
    assert len(entries(merchant)) == 1


def test_tampered_model_in_is_refused_before_training(small_layout):
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    req = request(small_layout, 1)
    bad = dataclasses.replace(req, arrays={k: v + np.float32(1) for k, v in req.arrays.items()})
    reply = run_merchant_round(bad, merchant)
    assert reply.outcome is Outcome.FAILED and "hash" in reply.reason and entries(merchant) == []


def test_non_private_needs_merchant_consent(small_layout):
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    config = RunConfig.from_toml(small_layout.config)
    config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, enabled=False))
    reply = run_merchant_round(request(small_layout, 1, config=config), merchant)
    assert reply.outcome is Outcome.REFUSED and "differential privacy" in reply.reason
    assert reply.code == RefusalCode.PRIVATE_ONLY.value


def test_release_the_platform_missed_travels_as_backlog(small_layout):
    """A crash after the ledger append loses the send, never the record: the next reply has it."""
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    first = run_merchant_round(request(small_layout, 1), merchant)  # never reaches the platform
    second = run_merchant_round(request(small_layout, 2, first.arrays, server_seq=0), merchant)
    assert second.ledger_backlog == (first.ledger_entry,)
    caught_up = run_merchant_round(request(small_layout, 3, second.arrays, server_seq=2), merchant)
    assert caught_up.ledger_backlog == ()


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_the_recorded_accountant_is_the_one_that_calibrated_and_capped(small_layout, kind):
    from common.accounting import AccountantKind

    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    config = RunConfig.from_toml(small_layout.config)
    accountant = AccountantKind(kind)
    config = dataclasses.replace(
        config, privacy=dataclasses.replace(config.privacy, accountant=accountant)
    )
    reply = run_merchant_round(request(small_layout, 1, config=config), merchant)
    (entry,) = entries(merchant)
    release = entry.release
    assert release.accountant is accountant
    history = [release.mechanism_step]
    assert release.epsilon_after == pytest.approx(
        epsilon_spent(history, delta=release.delta, accountant=accountant)
    )
    assert release.epsilon_rdp == pytest.approx(
        epsilon_spent(history, delta=release.delta, accountant=AccountantKind.RDP)
    )
    # calibrated by the named accountant: the planned rounds end just under the cap with it
    planned = [MechanismStep(release.noise_multiplier, release.sample_rate, release.steps * 3)]
    total = epsilon_spent(planned, delta=release.delta, accountant=accountant)
    assert 0.97 * release.epsilon_cap <= total <= release.epsilon_cap * (1 + 1e-9)
    assert reply.metrics["epsilon"] == release.epsilon_after


def test_the_reply_holds_only_shared_arrays_never_the_local_part(small_layout):
    """A merchant with a fitted local part (blend and personal weights) trains a round: the
    reply as encoded for Flower carries exactly the shared parameters, none of them the
    personal weights, and the local part stays as it was on disk."""
    from client.evaluation import local_state_path
    from common.nextbasket.local import LocalHead, LocalState
    from common.protocol import MerchantReply

    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    config = RunConfig.from_toml(small_layout.config)
    shared = initial_model(config)
    personal = {k: v + 7.0 for k, v in shared.items()}
    path = local_state_path(merchant)
    path.parent.mkdir(parents=True, exist_ok=True)
    LocalState(
        merchant.id,
        LocalHead(popularity_weight=0.5),
        prox=0.1,
        personal=personal,
        shared_sha256=arrays_sha256(shared),
    ).save(path)
    before = path.read_bytes()

    reply = run_merchant_round(request(small_layout, 1, shared), merchant)
    sent = MerchantReply.from_content(reply.to_content()).arrays
    assert reply.outcome is Outcome.TRAINED and sent is not None
    assert set(sent) == set(shared)
    for name, array in sent.items():
        assert array.shape == shared[name].shape
        assert not np.allclose(array, personal[name], atol=1.0)
    assert path.read_bytes() == before
