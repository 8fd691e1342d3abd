"""Federated evaluation at the merchant: its own held-out events, sums and counts only."""

from __future__ import annotations

import dataclasses

import pytest

from client.evaluation import evaluate_at_merchant
from common.config import RunConfig
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
    for part in (EvalPart.VALIDATION, EvalPart.TEST):
        sums = reply.sums[part]["global"]
        assert sums.cases == 200  # evaluation.max_cases_per_merchant in the small config
        assert set(sums.means()) == {"auc", "hr@10", "ndcg@10"}
        assert 0.0 < sums.means()["auc"] < 1.0
    # the reply survives Flower's encoding with nothing but the sums in it
    content = reply.to_content()
    decoded = EvaluationReply.from_content(content, tasks)
    assert decoded.sums[EvalPart.TEST]["global"] == reply.sums[EvalPart.TEST]["global"]
    keys = set(content["metrics"].keys())
    assert all(
        k == "eval-seconds" or k.rsplit("|", 1)[1] in {"sum", "sumsq", "count"} for k in keys
    )


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
    odd = {"w": initial_model(RunConfig.from_toml(small_layout.config))["out.weight"]}
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
