"""Federated evaluation at the merchant: its own held-out events, sums and counts only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from client.evaluation import evaluate_at_merchant
from common.config import RunConfig
from common.events import read_events
from common.nextbasket.metrics import SAMPLED, metric_names
from common.protocol import (
    EvalPart,
    EvaluateInstruction,
    EvaluationReply,
    FailureCode,
    Outcome,
    RefusalCode,
)
from server.federation import initial_model


def _instruction(layout, tasks, models=None) -> EvaluateInstruction:
    config = RunConfig.from_toml(layout.config)
    return EvaluateInstruction(
        run_id="eval-test",
        round=1,
        config=config,
        models=models or {"global": initial_model(config)},
        tasks=tasks,
    )


def test_sums_and_counts_for_validation_and_test(small_layout):
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    tasks = ((EvalPart.VALIDATION, "global"), (EvalPart.TEST, "global"))
    reply = evaluate_at_merchant(_instruction(small_layout, tasks), merchant)
    assert reply.outcome is Outcome.TRAINED
    for part, path in (
        (EvalPart.VALIDATION, merchant.validation_data),
        (EvalPart.TEST, merchant.test_data),
    ):
        sums = reply.sums[part]["global"]
        # one case per household with a basket in the part
        assert sums.cases == read_events(path)["customer_id"].nunique()
        assert set(sums.means()) == {*metric_names(), SAMPLED}
        assert 0.0 < sums.means()["ndcg@10"] < 1.0
    # the reply survives Flower's encoding with nothing but the sums in it
    content = reply.to_content()
    decoded = EvaluationReply.from_content(content, tasks)
    assert decoded.sums[EvalPart.TEST]["global"] == reply.sums[EvalPart.TEST]["global"]
    keys = set(content["metrics"].keys())
    assert all(
        k == "eval-seconds" or k.rsplit("|", 1)[1] in {"sum", "sumsq", "count"} for k in keys
    )


def test_local_baselines_and_the_local_part_are_scored_at_the_merchant(small_layout):
    """P-TopFreq from the merchant's own data, the same figure the library computes; the
    model with its local part fitted on validation (and kept for serving) on the test part."""
    from client.evaluation import local_state_path
    from client.merchant_data import period_log_of_files
    from common.nextbasket import baselines
    from common.nextbasket.metrics import case_metrics

    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    tasks = ((EvalPart.TEST, "p-topfreq"), (EvalPart.TEST, "global+local"))
    reply = evaluate_at_merchant(_instruction(small_layout, tasks), merchant)
    assert reply.outcome is Outcome.TRAINED, reply.reason
    config = RunConfig.from_toml(small_layout.config)
    periods = period_log_of_files(
        [merchant.data, merchant.validation_data, merchant.test_data], config.model
    )
    cases, _, popularity = periods.heldout(3)
    expected = baselines.break_ties(
        baselines.p_topfreq(periods.log, cases, popularity), popularity[cases.catalogue]
    )
    ndcg = case_metrics(expected, cases)["ndcg@10"]
    got = reply.sums[EvalPart.TEST]["p-topfreq"].metrics["ndcg@10"]
    assert got.total == pytest.approx(float(ndcg[~np.isnan(ndcg)].sum()))
    assert "global+local" in reply.sums[EvalPart.TEST]
    assert local_state_path(merchant).exists()


def test_a_merchant_with_nothing_held_out_refuses(small_layout):
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    bare = dataclasses.replace(merchant, validation_data=None, test_data=None)
    reply = evaluate_at_merchant(
        _instruction(small_layout, ((EvalPart.VALIDATION, "global"),)), bare
    )
    assert reply.outcome is Outcome.REFUSED
    assert reply.code == RefusalCode.NO_EVALUATION_DATA.value


def test_a_model_of_another_shape_is_a_bad_request(small_layout):
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    odd = {"w": initial_model(RunConfig.from_toml(small_layout.config))["repeat_out.weight"]}
    reply = evaluate_at_merchant(
        _instruction(small_layout, ((EvalPart.VALIDATION, "global"),), {"global": odd}), merchant
    )
    assert reply.outcome is Outcome.FAILED and reply.code == FailureCode.BAD_REQUEST.value


def test_evaluation_noise_blurs_every_sum_from_the_merchant_secret(small_layout):
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    tasks = ((EvalPart.VALIDATION, "global"),)
    exact = evaluate_at_merchant(_instruction(small_layout, tasks), merchant)
    noisy_merchant = dataclasses.replace(merchant, evaluation_noise=3.0)
    noisy = evaluate_at_merchant(_instruction(small_layout, tasks), noisy_merchant)
    again = evaluate_at_merchant(_instruction(small_layout, tasks), noisy_merchant)
    a = exact.sums[EvalPart.VALIDATION]["global"].metrics["ndcg@10"]
    b = noisy.sums[EvalPart.VALIDATION]["global"].metrics["ndcg@10"]
    assert b.total != a.total and b.count != a.count
    assert b.total == pytest.approx(a.total, abs=20) and b.count == pytest.approx(a.count, abs=20)
    # the merchant replays its own noise; nothing the platform sent fixes it
    assert again.sums == noisy.sums
