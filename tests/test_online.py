"""Online fine-tuning: inbox cohort rounds, the loop's gate/promote/rollback through federated
evaluation, restarts, and the in-process weekly stream through the real ClientApp."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.dp_randomness import MerchantSecret, load_merchant_secret
from client.finetune import choose_cohort, run_finetune_round
from client.holdout import held_out
from client.inbox import Cohort
from common.arrays_io import arrays_sha256
from common.config import RunConfig
from common.configparse import apply_overrides
from common.events import CUSTOMER_ID
from common.keys import load_signing_key
from common.ledger import MerchantLedger
from common.metric_sums import MetricSums
from common.protocol import Outcome, RefusalCode, TrainInstruction
from server.federated_evaluation import EvaluationOutcome
from server.federation import RoundOutcome, initial_model
from server.online import OnlineLoop, OnlineSettings, platform_keys
from server.publish import PublishReport
from server.strategies import MerchantUpdate
from simulations.online import (
    StreamSpec,
    WeeklyStream,
    drop_file,
    enable_inboxes,
    inbox_root,
    simulate_online,
)
from simulations.provision import load_events
from simulations.runner import Transport

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def _request(config: RunConfig, rnd: int, *, planned: int = 1) -> TrainInstruction:
    arrays = initial_model(config)
    return TrainInstruction(
        run_id="online-test",
        round=rnd,
        planned_rounds=planned,
        config=config,
        arrays=arrays,
        model_in_sha256=arrays_sha256(arrays),
    )


@pytest.fixture
def streaming(small_layout, small_overrides):
    config = RunConfig.from_dict(apply_overrides({}, small_overrides))
    spec = StreamSpec(41, 42, stream_epsilon_cap=1.0)
    merchants = enable_inboxes(small_layout, spec)
    stream = WeeklyStream(load_events(config))
    return small_layout, config, spec, merchants, stream


def test_finetune_trains_on_the_inbox_cohort_then_refuses_when_spent(streaming):
    layout, config, spec, merchants, stream = streaming
    merchant_id = sorted(merchants)[0]
    merchant = merchants[merchant_id]
    events = stream.week(merchant_id, 41)
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
    secret = load_merchant_secret(merchant.state_dir)
    kept = ~held_out(events[CUSTOMER_ID], secret=secret, share=spec.holdout_share)
    assert 0 < kept.sum() < len(events)  # the held-out customers did not train
    assert entry.release.dataset_size == int(kept.sum())

    again = run_finetune_round(_request(config, 11), merchant, now=NOW)
    assert again.outcome is Outcome.REFUSED and again.code == RefusalCode.COHORT_SPENT.value
    assert "stream-000001" in again.reason


def test_finetune_refuses_when_the_cohort_budget_cannot_pay(streaming):
    layout, config, _spec, merchants, stream = streaming
    merchant_id = sorted(merchants)[1]
    merchant = replace(merchants[merchant_id], stream_epsilon_cap=1e-3)
    drop_file(inbox_root(layout, merchant_id), "week-41.parquet", stream.week(merchant_id, 41))
    reply = run_finetune_round(_request(config, 10), merchant, now=NOW)
    assert reply.outcome is Outcome.REFUSED and reply.arrays is None
    assert reply.code == RefusalCode.BUDGET.value and "cohort stream-000001" in reply.reason
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
    assert empty.outcome is Outcome.REFUSED and empty.code == RefusalCode.NO_FRESH_DATA.value
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
    assert spent.cohort is None and spent.code is RefusalCode.COHORT_SPENT


def test_held_out_customers_are_a_fixed_share_keyed_by_the_merchant_secret():
    customers = pd.Series([f"c{i}" for i in range(20_000)])
    secret = MerchantSecret(b"\x07" * 32)
    mask = held_out(customers, secret=secret, share=0.2)
    assert abs(mask.mean() - 0.2) < 0.01
    assert np.array_equal(mask, held_out(customers, secret=secret, share=0.2))
    other = held_out(customers, secret=MerchantSecret(b"\x08" * 32), share=0.2)
    assert not np.array_equal(mask, other)
    # a customer is held out in every week or in none
    twice = pd.Series(["c5", "c5", "c17"])
    assert list(held_out(twice, secret=secret, share=0.2)) == [mask[5], mask[5], mask[17]]


# -- the loop with a scripted runtime ------------------------------------------------------


class ScriptedRuntime:
    """Updates of chosen values; every model scores ``1 - |mean(w) - target|`` at every merchant."""

    def __init__(self, target: list[float]) -> None:
        self.next: list[float] = []
        self.rounds: list[int] = []
        self.target = target
        self.evaluations: list[tuple] = []
        self.published: list[int] = []

    def train(self, arrays, rnd):
        self.rounds.append(rnd)
        outcome = RoundOutcome()
        for i, value in enumerate(self.next):
            name = f"m{i}"
            outcome.updates.append(MerchantUpdate(name, {"w": np.full(3, value, np.float32)}, 10))
            outcome.epsilon[name] = 0.5
        outcome.refused["late"] = "no fresh data: the inbox has no accepted cohort yet"
        outcome.refusal_codes["late"] = RefusalCode.NO_FRESH_DATA.value
        return outcome

    def evaluate(self, models, tasks, rnd):
        self.evaluations.append(tasks)
        outcome = EvaluationOutcome()
        for merchant in ("m0", "m1"):
            sums: dict = {}
            for part, label in tasks:
                score = 1.0 - abs(float(models[label]["w"].mean()) - self.target[0])
                sums.setdefault(part, {})[label] = MetricSums.of(
                    {"ndcg@10": [score] * 10, "recall@10": [0.5] * 10}
                )
            outcome.sums[merchant] = sums
        return outcome

    def epsilon_remaining(self):
        return {"m0": 0.5, "m1": 0.5}

    def publish(self, publisher, *, reason):
        signed = publisher.sign(reason=reason)
        self.published.append(signed.publication.serving)
        return PublishReport(signed.publication.serial)


def _loop(tmp_path: Path, runtime: ScriptedRuntime) -> OnlineLoop:
    private, public = platform_keys(tmp_path / "keys")
    settings = OnlineSettings(
        registry_dir=tmp_path / "registry",
        signing_key=private,
        verify_key=public,
        gate_tolerance=0.01,
        rollback_tolerance=0.02,
    )
    return OnlineLoop(config=RunConfig(), settings=settings, runtime=runtime)


def test_loop_gates_promotes_keeps_and_rolls_back(tmp_path):
    runtime = ScriptedRuntime([1.0])
    loop = _loop(tmp_path, runtime)
    start = loop.bootstrap({"w": np.full(3, 0.5, np.float32)}, round=5, metrics={"ndcg@10": 0.5})

    runtime.next = [0.6, 0.6]
    better = loop.step(first_round=6, trigger="test")
    assert better.round == 6 and better.promoted and better.serving == better.candidate
    assert better.prequential["ndcg@10"] == pytest.approx(0.5)  # the serving model, before
    assert better.prequential_cases == 20
    assert better.refused == {"late": "no fresh data: the inbox has no accepted cohort yet"}
    version = loop.registry.get(better.candidate)
    assert version.parent == start.id and version.round == 6
    assert version.merchants == ("m0", "m1") and version.privacy == {"m0": 0.5, "m1": 0.5}
    assert version.metrics["ndcg@10"] == pytest.approx(0.6)
    assert version.metrics["serving_ndcg@10"] == pytest.approx(0.5)

    runtime.next = [0.3, 0.3]
    worse = loop.step(first_round=6, trigger="test")
    assert worse.round == 7 and not worse.promoted and worse.serving == better.candidate
    assert "kept, not promoted" in worse.reason
    assert worse.rollback is None  # the serving 0.6 still beats its parent 0.5

    runtime.next = [0.9]  # one update < min_merchants: no candidate, nothing registered
    lonely = loop.step(first_round=6, trigger="test")
    assert lonely.candidate is None and lonely.serving == better.candidate
    assert len(loop.registry.list()) == 3
    # Each gate decision is recorded with the version it was compared against.
    assert loop.registry.gate_history() == [
        (better.candidate, start.id, True, better.reason),
        (worse.candidate, better.candidate, False, worse.reason),
    ]

    runtime.target[0] = 0.5  # newer data favours the older model: 1.0 vs 0.9
    runtime.next = []
    rolled = loop.step(first_round=6, trigger="test")
    assert rolled.rollback is not None and "replaced" in rolled.rollback
    assert rolled.serving_before == better.candidate and rolled.serving == start.id
    assert loop.serving()[0].id == start.id
    assert loop.metrics.store.value("fedshop_promoted_version") == start.id
    # every change of the serving version went out to the merchants, and nothing else did
    assert runtime.published == [start.id, better.candidate, start.id]
    assert loop.metrics.store.value("fedshop_rounds_total") == 4
    assert (
        loop.metrics.store.value("fedshop_refusals_total", merchant="late", reason="no-fresh-data")
        == 4
    )


def test_registry_and_round_numbers_survive_a_restart(tmp_path):
    runtime = ScriptedRuntime([1.0])
    loop = _loop(tmp_path, runtime)
    loop.bootstrap({"w": np.full(3, 0.5, np.float32)}, round=5, metrics={})
    runtime.next = [0.7, 0.7]
    promoted = loop.step(first_round=6, trigger="t")
    del loop

    again = _loop(tmp_path, runtime)
    kept = again.bootstrap({"w": np.full(3, 0.1, np.float32)}, round=5, metrics={})
    assert kept.id == promoted.serving  # the restart serves what was promoted, no new version
    np.testing.assert_allclose(again.serving()[1]["w"], 0.7, rtol=1e-6)
    runtime.next = [0.8, 0.8]
    after = again.step(first_round=6, trigger="t")
    assert after.round == 7 and runtime.rounds == [6, 7]
    assert after.candidate is not None
    assert again.registry.get(after.candidate).parent == promoted.serving


# -- in-process end to end on tiny synthetic data ----------------------------------------


def test_in_process_weeks_through_the_real_client_app(streaming):
    """Offline rounds and two streamed weeks through the production round loop, acceptance and
    federated evaluation (only the transport is in-process)."""
    layout, _config, spec, _merchants, _stream = streaming
    summary = simulate_online(layout, spec, transport=Transport.IN_PROCESS, reference_offline=True)
    assert summary["weeks"] == 2 and summary["candidates"] == 2
    import json

    rows = json.loads((layout.root / "online.json").read_text())["weeks"]
    assert [r["week"] for r in rows] == [41, 42] and [r["round"] for r in rows] == [4, 5]
    for row in rows:
        # prequential figures come from the merchants, on every event of the new week
        assert row["prequential_cases"] > 50 and 0.0 < row["prequential"]["ndcg@10"] < 1.0
        # the offline model scored on the same week, with refreshed and with stale histories
        assert set(row["references"]) == {"offline", "offline@stale"}
        assert all(0.0 < r["ndcg@10"] < 1.0 for r in row["references"].values())
        assert len(row["trained"]) == 3 and row["candidate"] is not None
        assert row["candidate_metrics"] and row["serving_metrics"]
        assert set(row["epsilon_remaining"]) == set(layout.merchant_ids())
        assert all(0 <= v < 1.0 for v in row["epsilon_remaining"].values())
    lines = (layout.root / "online.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith(
        "week,ndcg@10,recall@10,ndcg@20,recall@20,cases,"
    )
    assert not any(p.name.startswith("eval-") for p in (layout.root / "server").iterdir())
    # each merchant's serving mirror holds the version the platform serves
    from client.model_mirror import ModelMirror
    from common.keys import load_verify_key

    serving = rows[-1]["serving"]
    for merchant_id in layout.merchant_ids():
        merchant = layout.merchant_config(merchant_id)
        mirror = ModelMirror(merchant.models_dir, verify_key=load_verify_key(merchant.platform_key))
        publication = mirror.publication()
        assert publication is not None and publication.serving == serving


def test_server_online_flag_passes_the_run_config_key(tmp_path):
    import argparse

    from server.online import online_enabled, online_settings
    from simulations.commands import deploy

    parser = argparse.ArgumentParser()
    deploy.register(parser.add_subparsers())
    from common.keys import generate_keypair

    app = Path(__file__).resolve().parents[1]  # this project's own Flower app (pyproject)
    run_toml = tmp_path / "run.toml"
    run_toml.write_text("[federation]\nrounds = 1\n")
    generate_keypair(tmp_path / "keys", name="m1")
    argv = ["server", "--insecure-dev", "--state", str(tmp_path / "s"), "--app", str(app)]
    argv += ["--config", str(run_toml), "--run-dir", str(tmp_path / "run")]
    argv += ["--keys-dir", str(tmp_path / "keys")]
    args = parser.parse_args([*argv, "--port", "0", "--control-port", "0", "--online"])
    plan = deploy.plan_server(args)
    assert plan.run is not None and ("online", "true") in plan.run.flwr_config
    assert online_enabled(plan.run.run_config())
    assert not online_enabled({"online": ""})
    settings = online_settings(tmp_path / "run")
    assert settings.registry_dir == tmp_path / "run" / "registry"
    assert settings.signing_key.exists() and settings.verify_key.exists()


def test_an_undefined_metric_reaches_the_event_log_as_null(tmp_path):
    """A week whose cases hold no explore item has no explore mean (NaN): the event log, which
    refuses NaN, records null and the online round goes on."""
    import json as _json

    from server.monitoring import EventLog
    from server.online import StepResult, _json_ready

    result = StepResult(
        round=3, trigger="inbox", trained=("m0",), refused={}, failed={}, candidate=2,
        promoted=True, serving_before=1, serving=2, reason="ok",
        prequential={"ndcg@10": 0.2, "ndcg@10:explore": float("nan")},
        references={"offline": {"ndcg@10:explore": float("nan")}},
    )  # fmt: skip
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("online_round", **_json_ready(result.to_dict()))
    row = _json.loads((tmp_path / "events.jsonl").read_text())
    assert row["prequential"] == {"ndcg@10": 0.2, "ndcg@10:explore": None}
    assert row["references"] == {"offline": {"ndcg@10:explore": None}}
    assert np.isnan(result.to_dict()["prequential"]["ndcg@10:explore"])  # online.json keeps NaN
