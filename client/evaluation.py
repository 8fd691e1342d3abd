"""Federated evaluation at the merchant: rank its whole catalogue for its own held-out households.

The platform sends models and names parts of the merchant's held-out data
(:class:`~common.protocol.EvalPart`) and labels; the merchant builds next-basket cases from its
own events (docs/evaluation.md: one case per household with a basket in the part, its first
basket there, ranked against every product the merchant sold in its training period), scores
them and replies with metric sums and counts (:class:`~common.metric_sums.MetricSums`), nothing
per customer. Optionally it blurs every sum with Gaussian noise drawn from its own secret
(``merchant.evaluation_noise``).

Labels:
- a model the platform sent, scored with the shared weights (ties broken by the merchant's own
  sales, as for every method);
- ``<model>+local``: the same with the merchant's local part (client/nextbasket_local.py); on
  the test part the local part is fitted on the validation part first and saved for serving;
- ``p-topfreq`` and ``g-topfreq``: the local baselines, computed at the merchant from its own
  data (a household's own purchase counts; the merchant's best sellers).

Parts and their data:
- ``valid``: ``merchant.validation_data`` after the training events;
- ``test``: ``merchant.test_data`` after training and validation events;
- ``fresh``: the newest inbox cohort if nothing has trained on it yet (prequential);
- ``recent``: the held-out customers' cases of the newest inbox cohort (the online gate).
"""

from __future__ import annotations

import logging
import time
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
from client.merchant_data import PeriodLog, period_log, period_log_of_files, training_data
from client.nextbasket_local import (
    HeldOut,
    final_scores,
    fit_local_state,
    raw_scores,
    scores_with,
)
from common.config import RunConfig
from common.errors import CheckpointError, FedshopError, IntegrityError
from common.events import read_events
from common.keys import load_signing_key
from common.ledger import MerchantLedger
from common.metric_sums import MetricSum, MetricSums
from common.nextbasket import baselines
from common.nextbasket.baskets import BasketLog, CaseSet
from common.nextbasket.features import history_features
from common.nextbasket.local import LocalHead, LocalState
from common.nextbasket.metrics import SAMPLED, case_metrics, sampled_ndcg
from common.nextbasket.model import BasketScorer, RecordTensors, load_shared_arrays
from common.nextbasket.neighbours import NeighbourIndex
from common.nextbasket.records import training_records
from common.protocol import (
    BASELINE_LABELS,
    LOCAL_SUFFIX,
    STALE_SUFFIX,
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
LOCAL_STATE_FILE = "nextbasket-local.npz"
SAMPLED_METRIC = SAMPLED


class NothingHeldOut(Exception):  # noqa: N818 - a refusal signal inside this module, not an error
    """The merchant holds nothing for the part asked: it refuses (no fedshop error)."""


@dataclass(frozen=True)
class Part:
    """The held-out cases of one part, with the log they come from."""

    periods: PeriodLog
    heldout: HeldOut


def local_state_path(merchant: MerchantConfig) -> Path:
    return merchant.state_dir / LOCAL_STATE_FILE


def heldout_part(periods: PeriodLog, period: int, rows: np.ndarray | None = None) -> Part:
    """A held-out period of ``periods`` (its ``rows`` only, if given) as the evaluation scores it,
    neighbour scores included."""
    cases, features, popularity = periods.heldout(period)
    if rows is not None:
        cases = cases.subset(rows)
        features = history_features(periods.log, cases)
    held = HeldOut(
        cases,
        features,
        popularity[cases.catalogue],
        periods.items,
        neighbours=neighbour_scores(periods.log, cases),
    )
    return Part(periods, held)


def neighbour_scores(log: BasketLog, cases: CaseSet) -> np.ndarray:
    """The cases' neighbour scores from every household's baskets before the earliest case
    (held-out cases share one cutoff: their period's start)."""
    before = float(cases.day.min()) if len(cases) else 0.0
    index = NeighbourIndex.build(log, before_day=before, catalogue=cases.catalogue)
    return index.scores(cases)


def offline_parts(merchant: MerchantConfig, wanted: set[EvalPart], config: RunConfig) -> dict:
    """``valid`` and ``test`` from the merchant's held-out files."""
    files = [merchant.data]
    if merchant.validation_data is not None:
        files.append(merchant.validation_data)
    out: dict[EvalPart, Part] = {}
    if EvalPart.VALIDATION in wanted and merchant.validation_data is not None:
        out[EvalPart.VALIDATION] = heldout_part(period_log_of_files(files, config.model), 2)
    if EvalPart.TEST in wanted and merchant.test_data is not None:
        periods = period_log_of_files([*files, merchant.test_data], config.model)
        out[EvalPart.TEST] = heldout_part(periods, periods.periods)
    return out


def _trained_cohorts(merchant: MerchantConfig) -> set[str]:
    if not merchant.ledger_path.exists():
        return set()
    with MerchantLedger.open(
        merchant.ledger_path,
        merchant_id=merchant.id,
        signing_key=load_signing_key(merchant.signing_key),
    ) as ledger:
        return {e.release.cohort for e in ledger.entries()}


def online_parts(
    merchant: MerchantConfig,
    wanted: set[EvalPart],
    config: RunConfig,
    secret: MerchantSecret,
    *,
    stale: bool = False,
) -> tuple[dict[EvalPart, Part], Part | None]:
    """``fresh`` and ``recent`` from the inbox: the newest cohort after everything before it;
    with ``stale``, also the fresh cases with histories cut at the training data's end."""
    if merchant.inbox is None:
        return {}, None
    inbox = Inbox(merchant.inbox, arrival=merchant.inbox_arrival, merchant_id=merchant.id)
    inbox.scan(now=datetime.now(UTC))
    cohorts = sorted(inbox.cohorts(), key=lambda c: c.seq)
    if not cohorts:
        return {}, None
    newest, older = cohorts[-1], [c.cohort_id for c in cohorts[:-1]]
    training, fresh = read_events(merchant.data), inbox.load([newest.cohort_id])
    before = [training, *([inbox.load(older)] if older else [])]
    periods = period_log([pd.concat(before, ignore_index=True), fresh], config.model)
    out: dict[EvalPart, Part] = {}
    stale_part: Part | None = None
    if EvalPart.FRESH in wanted and newest.cohort_id not in _trained_cohorts(merchant):
        out[EvalPart.FRESH] = heldout_part(periods, 2)
        if stale:
            stale_part = heldout_part(period_log([training, fresh], config.model), 2)
    if EvalPart.RECENT in wanted and merchant.holdout_share > 0:
        cases, _, _ = periods.heldout(2)
        customers = pd.Series(periods.log.customer_ids[cases.customer])
        rows = np.flatnonzero(held_out(customers, secret=secret, share=merchant.holdout_share))
        if len(rows):
            out[EvalPart.RECENT] = heldout_part(periods, 2, rows)
    return out, stale_part


def _local_state(
    merchant: MerchantConfig,
    part: EvalPart,
    shared: Arrays,
    config: RunConfig,
    secret: MerchantSecret,
    instruction: EvaluateInstruction,
) -> LocalState:
    """On the test part: fit the local part on validation and keep it (what the merchant will
    serve). Elsewhere: the one kept, or none."""
    path = local_state_path(merchant)
    if part is EvalPart.TEST:
        validation = offline_parts(merchant, {EvalPart.VALIDATION}, config).get(EvalPart.VALIDATION)
        if validation is None:
            return LocalState(merchant.id)
        train = training_data(merchant.data, config.model)
        records = training_records(
            train.cases,
            train.features,
            train.items,
            unit=merchant.privacy_unit,
            spec=config.records,
            rng=secret.numpy_stream(instruction.run_id, "local-part", "records"),
        )
        state = fit_local_state(
            merchant_id=merchant.id,
            shared=shared,
            spec=config.model,
            records=RecordTensors.of(records),
            validation=validation.heldout,
            generator=secret.torch_stream(instruction.run_id, "local-part", "sampling"),
        )
        state.save(path)
        return state
    try:
        return (
            LocalState.load(path, merchant_id=merchant.id)
            if path.exists()
            else LocalState(merchant.id)
        )
    except CheckpointError:
        return LocalState(merchant.id)


def score_part(
    part: EvalPart,
    data: Part,
    labels: set[str],
    instruction: EvaluateInstruction,
    merchant: MerchantConfig,
    secret: MerchantSecret,
    stale_part: Part | None = None,
) -> dict[str, MetricSums]:
    """Every label on the same cases, as sums."""
    values = case_values(part, data, labels, instruction, merchant, secret, stale_part)
    return {label: MetricSums.of(v) for label, v in values.items()}


def case_values(
    part: EvalPart,
    data: Part,
    labels: set[str],
    instruction: EvaluateInstruction,
    merchant: MerchantConfig,
    secret: MerchantSecret,
    stale_part: Part | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Every label's per-case metric values on the same cases (NaN: the case does not count).
    They never leave the merchant; benchmarks of a simulation read them for bootstrap CIs."""
    held = data.heldout
    config = instruction.config
    out: dict[str, dict[str, np.ndarray]] = {}
    for label in sorted(labels):
        if label.endswith(STALE_SUFFIX):  # the same households, histories cut at training's end
            stale = stale_part.heldout if stale_part is not None else held
            raw = raw_scores(
                instruction.models[label.removesuffix(STALE_SUFFIX)], config.model, stale
            )
            scores = final_scores(raw, LocalHead(), stale)
            out[label] = _values(scores, stale, config, merchant, part)
            continue
        if label in BASELINE_LABELS:
            scores = _baseline(label, data)
        elif label.endswith(LOCAL_SUFFIX):
            shared = instruction.models[label.removesuffix(LOCAL_SUFFIX)]
            state = _local_state(merchant, part, shared, config, secret, instruction)
            scores = scores_with(state, shared, config.model, held)
        else:
            head = LocalHead()
            if part in (EvalPart.FRESH, EvalPart.RECENT):  # online: the blend it serves with
                shared = instruction.models[label]
                head = _local_state(merchant, part, shared, config, secret, instruction).head
            raw = raw_scores(instruction.models[label], config.model, held)
            scores = final_scores(raw, head, held)
        out[label] = _values(scores, held, config, merchant, part)
    return out


def _values(
    scores: np.ndarray, held: HeldOut, config: RunConfig, merchant: MerchantConfig, part: EvalPart
) -> dict[str, np.ndarray]:
    values = dict(case_metrics(scores, held.cases))
    values[SAMPLED_METRIC] = sampled_ndcg(
        scores,
        held.cases,
        # public cases: the same sampled candidates for every method and run
        rng=numpy_stream(config.seed, "sampled-negatives", merchant.id, part.value),
        negatives=config.evaluation.sampled_negatives,
    )
    return values


def _baseline(label: str, data: Part) -> np.ndarray:
    held = data.heldout
    popularity = np.zeros(data.periods.log.n_products)
    popularity[held.cases.catalogue] = held.popularity
    if label == "p-topfreq":
        raw = baselines.p_topfreq(data.periods.log, held.cases, popularity)
    else:
        raw = baselines.g_topfreq(held.cases, popularity)
    return baselines.break_ties(raw, held.popularity)


def _blur(sums: MetricSums, *, std: float, rng: np.random.Generator) -> MetricSums:
    """Gaussian noise on every sum, square sum and count (each case moves each by <= 1)."""
    if std <= 0:
        return sums
    noisy = {}
    for name, value in sums.metrics.items():
        a, b, c = rng.normal(0.0, std, size=3)
        noisy[name] = MetricSum(value.total + a, value.squares + b, max(value.count + c, 0.0))
    return MetricSums(noisy)


def _held_parts(
    merchant: MerchantConfig,
    parts: set[EvalPart],
    config: RunConfig,
    secret: MerchantSecret,
    *,
    stale_wanted: bool,
) -> tuple[dict[EvalPart, Part], Part | None]:
    """The parts asked that the merchant holds, and (if a stale label is asked) the fresh part
    with stale histories."""
    found: dict[EvalPart, Part] = dict(offline_parts(merchant, parts, config))
    stale = None
    if parts & {EvalPart.FRESH, EvalPart.RECENT}:
        online, stale = online_parts(merchant, parts, config, secret, stale=stale_wanted)
        found.update(online)
    return {p: d for p, d in found.items() if len(d.heldout.cases) > 0}, stale


def _model_problem(instruction: EvaluateInstruction) -> str | None:
    """Why a model sent cannot be this run's scorer (names and shapes), or None."""
    model = BasketScorer(instruction.config.model)
    for label, arrays in instruction.models.items():
        try:
            load_shared_arrays(model, arrays)
        except FedshopError as exc:
            return f"model {label!r}: {exc}"
    return None


def evaluate_at_merchant(
    instruction: EvaluateInstruction, merchant: MerchantConfig
) -> EvaluationReply:
    """Answer an evaluate instruction; never raises for expected failures."""
    began = time.perf_counter()
    problem = _model_problem(instruction)
    if problem is not None:
        return EvaluationReply(
            Outcome.FAILED, merchant.id, code=FailureCode.BAD_REQUEST.value, reason=problem
        )
    try:
        torch.set_num_threads(merchant.threads)
        secret = load_merchant_secret(ensure_merchant_secret(merchant.state_dir).parent)
        parts = {part for part, _ in instruction.tasks}
        stale_wanted = any(label.endswith(STALE_SUFFIX) for _, label in instruction.tasks)
        data, stale = _held_parts(
            merchant, parts, instruction.config, secret, stale_wanted=stale_wanted
        )
        if not data:
            raise NothingHeldOut(
                f"merchant {merchant.id} holds no events for {sorted(p.value for p in parts)}"
            )
        sums: dict[EvalPart, dict[str, MetricSums]] = {}
        for part, held in data.items():
            labels = {label for p, label in instruction.tasks if p is part}
            scored = score_part(part, held, labels, instruction, merchant, secret, stale)
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
