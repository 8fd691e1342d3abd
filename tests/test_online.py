"""Online fine-tuning: inbox cohort rounds, the loop's gate/promote/rollback, restarts."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from client.finetune import COHORT_SPENT, NO_FRESH_DATA, choose_cohort, run_finetune_round
from client.inbox import Cohort
from client.merchant_round import TrainRequest
from common.config import RunConfig
from common.configparse import apply_overrides
from common.keys import load_signing_key
from common.ledger import MerchantLedger
from common.model import arrays_sha256
from common.protocol import Outcome
from server.federation import RoundOutcome, initial_model
from server.online import OnlineLoop, OnlineSettings, platform_keys
from server.strategies import MerchantUpdate
from simulations.online import (
    InProcessRunner,
    StreamSpec,
    WeeklyStream,
    drive_weeks,
    drop_file,
    enable_inboxes,
    held_out,
    inbox_root,
    online_settings_for,
    write_online_results,
)
from simulations.provision import load_events

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def _request(config: RunConfig, rnd: int, *, planned: int = 1) -> TrainRequest:
    arrays = initial_model(config)
    return TrainRequest(
        run_id="online-test",
        round=rnd,
        planned_rounds=planned,
        seed=config.seed,
        model_in_sha256=arrays_sha256(arrays),
        config=config,
        arrays=arrays,
    )


@pytest.fixture
def streaming(small_layout, small_overrides):
    config = RunConfig.from_dict(apply_overrides({}, small_overrides))
    spec = StreamSpec(41, 42, stream_epsilon_cap=1.0)
    merchants = enable_inboxes(small_layout, spec)
    stream = WeeklyStream(load_events(config), config, spec)
    return small_layout, config, spec, merchants, stream


def test_finetune_trains_on_the_inbox_cohort_then_refuses_when_spent(streaming):
    layout, config, _spec, merchants, stream = streaming
    merchant_id = sorted(merchants)[0]
    merchant = merchants[merchant_id]
    events, _ = stream.split(merchant_id, 41)
    drop_file(inbox_root(layout, merchant_id), "week-41.parquet", events)

    first = run_finetune_round(_request(config, 10), merchant, now=NOW)
    assert first.outcome is Outcome.TRAINED, first.reason
    assert "stream-000001" in first.reason
    with MerchantLedger.open(
        merchant.ledger_path,
        merchant_id=merchant_id,
        signing_key=load_signing_key(merchant.signing_key),
    ) as ledger:
        (entry,) = ledger.entries()
    assert entry.release.cohort == "stream-000001"
    assert entry.release.epsilon_cap == pytest.approx(1.0)
    assert entry.release.epsilon_after <= 1.0 + 1e-9
    assert entry.release.dataset_size == len(events)

    again = run_finetune_round(_request(config, 11), merchant, now=NOW)
    assert again.outcome is Outcome.REFUSED
    assert again.reason.startswith(COHORT_SPENT) and "stream-000001" in again.reason


def test_finetune_refuses_when_the_cohort_budget_cannot_pay(streaming):
    layout, config, _spec, merchants, stream = streaming
    merchant_id = sorted(merchants)[1]
    merchant = replace(merchants[merchant_id], stream_epsilon_cap=1e-3)
    events, _ = stream.split(merchant_id, 41)
    drop_file(inbox_root(layout, merchant_id), "week-41.parquet", events)
    reply = run_finetune_round(_request(config, 10), merchant, now=NOW)
    assert reply.outcome is Outcome.REFUSED and reply.arrays is None
    assert reply.reason.startswith(f"{COHORT_SPENT}: cohort stream-000001")
    assert (
        not merchant.ledger_path.exists()
        or not MerchantLedger.open(
            merchant.ledger_path,
            merchant_id=merchant_id,
            signing_key=load_signing_key(merchant.signing_key),
        ).entries()
    )


def test_finetune_without_data_or_inbox(streaming):
    _layout, config, _spec, merchants, _stream = streaming
    merchant = merchants[sorted(merchants)[0]]
    empty = run_finetune_round(_request(config, 10), merchant, now=NOW)
    assert empty.outcome is Outcome.REFUSED and empty.reason.startswith(NO_FRESH_DATA)
    no_inbox = run_finetune_round(_request(config, 10), replace(merchant, inbox=None), now=NOW)
    assert no_inbox.outcome is Outcome.FAILED and "inbox" in no_inbox.reason


def _cohort(seq: int) -> Cohort:
    return Cohort(f"stream-{seq:06d}", seq, "f", "h", 10, 0, "a", "b", "c", Path("x"))


def test_choose_cohort_prefers_the_newest_with_rounds_left():
    cohorts = [_cohort(1), _cohort(2), _cohort(3)]
    assert choose_cohort(cohorts, {}, rounds=1).cohort == cohorts[2]
    assert choose_cohort(cohorts, {"stream-000003": 1}, rounds=1).cohort == cohorts[1]
    assert choose_cohort(cohorts, {"stream-000003": 1}, rounds=2).cohort == cohorts[2]
    spent = choose_cohort(cohorts, {c.cohort_id: 2 for c in cohorts}, rounds=2)
    assert spent.cohort is None and spent.reason.startswith(COHORT_SPENT)


def test_held_out_customers_are_a_fixed_seeded_share():
    import pandas as pd

    customers = pd.Series([f"c{i}" for i in range(20_000)])
    mask = held_out(customers, share=0.2, seed=7)
    assert abs(mask.mean() - 0.2) < 0.01
    assert np.array_equal(mask, held_out(customers, share=0.2, seed=7))
    assert not np.array_equal(mask, held_out(customers, share=0.2, seed=8))


# -- the loop with a scripted runner -----------------------------------------------------


class ScriptedRunner:
    def __init__(self) -> None:
        self.next: list[float] = []
        self.rounds: list[int] = []

    def run(self, arrays, rnd):
        self.rounds.append(rnd)
        outcome = RoundOutcome()
        for i, value in enumerate(self.next):
            name = f"m{i}"
            outcome.updates.append(MerchantUpdate(name, {"w": np.full(3, value, np.float32)}, 10))
            outcome.epsilon[name] = 0.5
            outcome.losses[name] = 1.0
        outcome.refused["late"] = "no fresh data: the inbox has no accepted cohort yet"
        return outcome

    def epsilon_remaining(self):
        return {"m0": 0.5, "m1": 0.5}


def _loop(tmp_path: Path, runner: ScriptedRunner, target: list[float]) -> OnlineLoop:
    private, public = platform_keys(tmp_path / "keys")
    settings = OnlineSettings(
        registry_dir=tmp_path / "registry",
        signing_key=private,
        verify_key=public,
        gate_tolerance=0.01,
        rollback_tolerance=0.02,
    )
    loop = OnlineLoop(config=RunConfig(), settings=settings, runner=runner)

    def score(arrays, evaluation):
        return {"ndcg@10": 1.0 - abs(float(arrays["w"].mean()) - target[0]), "auc": 0.5}

    loop.evaluate = score  # type: ignore[method-assign]
    return loop


def test_loop_gates_promotes_keeps_and_rolls_back(tmp_path):
    runner, target = ScriptedRunner(), [1.0]
    loop = _loop(tmp_path, runner, target)
    start = loop.bootstrap({"w": np.full(3, 0.5, np.float32)}, round=5, metrics={"ndcg@10": 0.5})
    gate_set = object()

    runner.next = [0.6, 0.6]
    better = loop.step(gate_set, first_round=6, trigger="test")  # type: ignore[arg-type]
    assert better.round == 6 and better.promoted and better.serving == better.candidate
    assert better.refused == {"late": "no fresh data: the inbox has no accepted cohort yet"}
    version = loop.registry.get(better.candidate)
    assert version.parent == start.id and version.round == 6
    assert version.merchants == ("m0", "m1") and version.privacy == {"m0": 0.5, "m1": 0.5}
    assert version.metrics["ndcg@10"] == pytest.approx(0.6)
    assert version.metrics["serving_ndcg@10"] == pytest.approx(0.5)

    runner.next = [0.3, 0.3]
    worse = loop.step(gate_set, first_round=6, trigger="test")  # type: ignore[arg-type]
    assert worse.round == 7 and not worse.promoted and worse.serving == better.candidate
    assert "kept, not promoted" in worse.reason

    runner.next = [0.9]  # one update < min_merchants: no candidate, nothing registered
    lonely = loop.step(gate_set, first_round=6, trigger="test")  # type: ignore[arg-type]
    assert lonely.candidate is None and lonely.serving == better.candidate
    assert len(loop.registry.list()) == 3
    # Each gate decision is recorded with the version it was compared against.
    assert loop.registry.gate_history() == [
        (better.candidate, start.id, True, better.reason),
        (worse.candidate, better.candidate, False, worse.reason),
    ]

    assert loop.check_rollback(gate_set) is None  # type: ignore[arg-type]
    target[0] = 0.5  # newer data favours the older model: 1.0 vs 0.9
    reason = loop.check_rollback(gate_set)  # type: ignore[arg-type]
    assert reason is not None and "replaced" in reason
    assert loop.serving()[0].id == start.id
    assert loop.metrics.store.value("fedshop_promoted_version") == start.id
    assert loop.metrics.store.value("fedshop_rounds_total") == 3
    assert (
        loop.metrics.store.value("fedshop_refusals_total", merchant="late", reason="no-fresh-data")
        == 3
    )


def test_registry_and_round_numbers_survive_a_restart(tmp_path):
    runner, target = ScriptedRunner(), [1.0]
    loop = _loop(tmp_path, runner, target)
    loop.bootstrap({"w": np.full(3, 0.5, np.float32)}, round=5, metrics={})
    runner.next = [0.7, 0.7]
    promoted = loop.step(object(), first_round=6, trigger="t")  # type: ignore[arg-type]
    del loop

    again = _loop(tmp_path, runner, target)
    kept = again.bootstrap({"w": np.full(3, 0.1, np.float32)}, round=5, metrics={})
    assert kept.id == promoted.serving  # the restart serves what was promoted, no new version
    np.testing.assert_allclose(again.serving()[1]["w"], 0.7, rtol=1e-6)
    runner.next = [0.8, 0.8]
    after = again.step(object(), first_round=6, trigger="t")  # type: ignore[arg-type]
    assert after.round == 7 and runner.rounds == [6, 7]
    assert after.candidate is not None
    assert again.registry.get(after.candidate).parent == promoted.serving


# -- in-process end to end on tiny synthetic data ----------------------------------------


def test_in_process_weeks_register_versions_and_write_results(streaming):
    layout, config, spec, _merchants, stream = streaming
    settings = online_settings_for(layout, spec)
    runner = InProcessRunner(layout, config, run_id="inproc", rounds_per_cohort=1)
    loop = OnlineLoop(config=config, settings=settings, runner=runner)
    loop.bootstrap(initial_model(config), round=3, metrics={})
    rows = drive_weeks(loop, stream, layout, first_round=4)
    assert [r["week"] for r in rows] == [41, 42] and [r["round"] for r in rows] == [4, 5]
    for row in rows:
        assert 0.0 <= row["prequential"]["ndcg@10"] <= 1.0
        assert len(row["trained"]) == 3 and row["candidate"] is not None
        assert set(row["epsilon_remaining"]) == set(layout.merchant_ids())
        assert all(0 <= v <= 1.0 for v in row["epsilon_remaining"].values())
    write_online_results(layout.root, rows, {"weeks": 2})
    lines = (layout.root / "online.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("week,ndcg@10,auc,")


def test_server_online_flag_passes_the_run_config_key(tmp_path):
    import argparse

    from server.online import online_enabled, online_settings
    from simulations.commands import deploy

    parser = argparse.ArgumentParser()
    deploy.register(parser.add_subparsers())
    app = Path(__file__).resolve().parents[1]  # this project's own Flower app (pyproject)
    argv = ["server", "--insecure-dev", "--state", str(tmp_path / "s"), "--app", str(app)]
    args = parser.parse_args([*argv, "--port", "0", "--online"])
    plan = deploy.plan_server(args)
    assert ("online", "true") in plan.extra_run_config
    assert online_enabled(dict(plan.extra_run_config))
    assert not online_enabled({"online": ""})
    settings = online_settings(tmp_path / "run")
    assert settings.registry_dir == tmp_path / "run" / "registry"
    assert settings.signing_key.exists() and settings.verify_key.exists()
