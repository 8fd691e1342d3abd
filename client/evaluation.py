"""Federated evaluation at the merchant: score models on its own held-out customers.

The platform sends models and names parts of the merchant's held-out data
(:class:`~common.protocol.EvalPart`); the merchant builds the evaluation cases from its own
events, scores every model on the same cases and replies with metric sums and counts
(:class:`~common.metric_sums.MetricSums`), nothing per customer. Optionally it blurs every sum
with Gaussian noise drawn from its own secret (``merchant.evaluation_noise``).

Parts and their data:
- ``valid``: ``merchant.validation_data``, histories from the training events;
- ``test``: ``merchant.test_data``, histories from training and validation events;
- ``fresh``: the newest inbox cohort if nothing has trained on it yet (prequential: the
  serving model meets the data before any model learns from it);
- ``recent``: the held-out customers' events of the newest inbox cohort (the online gate).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client.dp_randomness import MerchantSecret, ensure_merchant_secret, load_merchant_secret
from client.holdout import held_out
from client.inbox import Inbox
from client.merchant import MerchantConfig
from common.config import RunConfig
from common.errors import FedshopError, IntegrityError
from common.evaluation import model_scores, per_case_metrics
from common.events import CUSTOMER_ID, read_events
from common.features import build_catalog, encode_events, evaluation_records
from common.keys import load_signing_key
from common.ledger import MerchantLedger
from common.metric_sums import MetricSum, MetricSums
from common.model import Recommender, load_state_arrays
from common.protocol import (
    EvalPart,
    EvaluateInstruction,
    EvaluationReply,
    FailureCode,
    Outcome,
    RefusalCode,
)
from common.rng import numpy_stream

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class HeldOut:
    """Events to score (``events``) and the merchant's earlier events (``context``): the
    histories of the cases and the catalogue candidates are drawn from."""

    events: pd.DataFrame
    context: pd.DataFrame


class NothingHeldOut(Exception):  # noqa: N818 - a refusal signal inside this module, not an error
    """The merchant holds nothing for the part asked: it refuses (no fedshop error)."""


def _read(path: Path | None, what: str, merchant: MerchantConfig) -> pd.DataFrame:
    if path is None:
        raise NothingHeldOut(f"merchant {merchant.id} has no {what} in its configuration")
    return read_events(path)


def _inbox_parts(merchant: MerchantConfig, secret: MerchantSecret) -> dict[EvalPart, HeldOut]:
    """``fresh`` and ``recent`` from the inbox (each missing when there is nothing to score)."""
    if merchant.inbox is None:
        return {}
    inbox = Inbox(merchant.inbox, arrival=merchant.inbox_arrival, merchant_id=merchant.id)
    inbox.scan(now=datetime.now(UTC))
    cohorts = inbox.cohorts()
    if not cohorts:
        return {}
    newest = max(cohorts, key=lambda c: c.seq)
    newest_events = inbox.load([newest.cohort_id])
    older = [c.cohort_id for c in cohorts if c.seq < newest.seq]
    context = pd.concat(
        [read_events(merchant.data), *([inbox.load(older)] if older else [])], ignore_index=True
    )
    parts: dict[EvalPart, HeldOut] = {}
    if newest.cohort_id not in _trained_cohorts(merchant):
        parts[EvalPart.FRESH] = HeldOut(newest_events, context)
    mask = held_out(newest_events[CUSTOMER_ID], secret=secret, share=merchant.holdout_share)
    if mask.any():
        parts[EvalPart.RECENT] = HeldOut(newest_events.loc[mask].reset_index(drop=True), context)
    return parts


def _trained_cohorts(merchant: MerchantConfig) -> set[str]:
    if not merchant.ledger_path.exists():
        return set()
    with MerchantLedger.open(
        merchant.ledger_path,
        merchant_id=merchant.id,
        signing_key=load_signing_key(merchant.signing_key),
    ) as ledger:
        return {e.release.cohort for e in ledger.entries()}


def held_out_data(
    merchant: MerchantConfig, parts: set[EvalPart], secret: MerchantSecret
) -> dict[EvalPart, HeldOut]:
    """The merchant's held-out data for each part asked that it has."""
    out: dict[EvalPart, HeldOut] = {}
    if parts & {EvalPart.VALIDATION, EvalPart.TEST}:
        train = _read(merchant.data, "training data", merchant)
        if EvalPart.VALIDATION in parts and merchant.validation_data is not None:
            out[EvalPart.VALIDATION] = HeldOut(read_events(merchant.validation_data), train)
        if EvalPart.TEST in parts and merchant.test_data is not None:
            before = [train]
            if merchant.validation_data is not None:
                before.append(read_events(merchant.validation_data))
            context = pd.concat(before, ignore_index=True)
            out[EvalPart.TEST] = HeldOut(read_events(merchant.test_data), context)
    if parts & {EvalPart.FRESH, EvalPart.RECENT}:
        inbox = _inbox_parts(merchant, secret)
        out.update({part: data for part, data in inbox.items() if part in parts})
    return {part: data for part, data in out.items() if len(data.events) > 0}


def score_models(
    models: Mapping[str, Arrays],
    data: HeldOut,
    *,
    config: RunConfig,
    rng: np.random.Generator,
) -> dict[str, MetricSums]:
    """Every model on the same cases: the bought product among sampled catalogue products
    (docs/evaluation.md)."""
    spec = config.model
    catalog = build_catalog(data.context if len(data.context) else data.events, spec)
    encoded = encode_events(data.events, spec, context=data.context if len(data.context) else None)
    records = evaluation_records(
        encoded,
        catalog,
        candidates=config.evaluation.candidates,
        max_cases=config.evaluation.max_cases_per_merchant,
        rng=rng,
    )
    out = {}
    model = Recommender(spec)
    for label, arrays in models.items():
        load_state_arrays(model, arrays)
        out[label] = MetricSums.of(per_case_metrics(model_scores(model, records)))
    return out


def _blur(sums: MetricSums, *, std: float, rng: np.random.Generator) -> MetricSums:
    """Gaussian noise on every sum, square sum and count (each case moves each by <= 1)."""
    if std <= 0:
        return sums
    noisy = {}
    for name, value in sums.metrics.items():
        a, b, c = rng.normal(0.0, std, size=3)
        noisy[name] = MetricSum(value.total + a, value.squares + b, max(value.count + c, 0.0))
    return MetricSums(noisy)


def evaluate_at_merchant(
    instruction: EvaluateInstruction, merchant: MerchantConfig
) -> EvaluationReply:
    """Answer an evaluate instruction; never raises for expected failures."""
    began = time.perf_counter()
    try:
        torch.set_num_threads(merchant.threads)
        secret = load_merchant_secret(ensure_merchant_secret(merchant.state_dir).parent)
        parts = {part for part, _ in instruction.tasks}
        data = held_out_data(merchant, parts, secret)
        if not data:
            raise NothingHeldOut(
                f"merchant {merchant.id} holds no events for {sorted(p.value for p in parts)}"
            )
        sums: dict[EvalPart, dict[str, MetricSums]] = {}
        for part, held in data.items():
            labels = {label for p, label in instruction.tasks if p is part}
            rng = numpy_stream(instruction.config.seed, "evaluation", merchant.id, part.value)
            scored = score_models(
                {label: instruction.models[label] for label in sorted(labels)},
                held,
                config=instruction.config,
                rng=rng,
            )
            noise = secret.numpy_stream(
                instruction.run_id, "round", instruction.round, "evaluation-noise", part.value
            )
            sums[part] = {
                label: _blur(value, std=merchant.evaluation_noise, rng=noise)
                for label, value in scored.items()
            }
    except NothingHeldOut as exc:
        return EvaluationReply(
            Outcome.REFUSED, merchant.id, code=RefusalCode.NO_EVALUATION_DATA.value, reason=str(exc)
        )
    except FedshopError as exc:
        log.error("merchant %s evaluation failed: %s", merchant.id, exc.one_line())
        code = FailureCode.INTEGRITY if isinstance(exc, IntegrityError) else FailureCode.DATA
        return EvaluationReply(Outcome.FAILED, merchant.id, code=code.value, reason=exc.one_line())
    except ValueError as exc:  # e.g. a model of another shape
        return EvaluationReply(
            Outcome.FAILED, merchant.id, code=FailureCode.BAD_REQUEST.value, reason=str(exc)
        )
    return EvaluationReply(
        Outcome.TRAINED, merchant.id, sums=sums, seconds=time.perf_counter() - began
    )
