"""A fine-tuning round on the merchant's newest inbox cohort (message type ``train.finetune``).

The merchant scans its inbox, picks the newest accepted cohort that has not yet taken part in
``planned_rounds`` releases (the number of fine-tuning rounds a stream cohort may join), and
trains on that cohort alone through :func:`client.merchant_round.run_merchant_round` with the
cohort as the ledger's ``cohort`` and ``stream_epsilon_cap`` as its cap. Event-level
accounting is then per cohort (each event sits in exactly one cohort); customer-level
accounting composes every release of the merchant. Customer histories are built from the
cohort's own events only, so a release depends on no event outside its cohort. Customers held
out for the online gate (``holdout_share``, client/holdout.py) are left out of training.

The cohort is read once, from the bytes whose hash the inbox checked, and trained on as read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pandas as pd

from client.dp_randomness import ensure_merchant_secret, load_merchant_secret
from client.holdout import held_out
from client.inbox import Cohort, Inbox
from client.merchant import MerchantConfig
from client.merchant_data import TrainingData, period_log
from client.merchant_round import open_merchant_ledger, run_merchant_round
from common.errors import ConfigError, FedshopError, IntegrityError
from common.events import CUSTOMER_ID
from common.ledger import MerchantLedger
from common.protocol import FailureCode, MerchantReply, Outcome, RefusalCode, TrainInstruction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortChoice:
    """The cohort to train on, or ``None`` with the refusal code and a sentence saying why."""

    cohort: Cohort | None
    code: RefusalCode | None
    reason: str


def releases_per_cohort(ledger: MerchantLedger) -> dict[str, int]:
    """How many signed releases each cohort already took part in."""
    counts: dict[str, int] = {}
    for entry in ledger.entries():
        counts[entry.release.cohort] = counts.get(entry.release.cohort, 0) + 1
    return counts


def choose_cohort(cohorts: list[Cohort], used: dict[str, int], *, rounds: int) -> CohortChoice:
    """Newest cohort with rounds left: recency matters most for an online model."""
    if not cohorts:
        return CohortChoice(
            None, RefusalCode.NO_FRESH_DATA, "no fresh data: the inbox has no accepted cohort yet"
        )
    for cohort in sorted(cohorts, key=lambda c: c.seq, reverse=True):
        if used.get(cohort.cohort_id, 0) < rounds:
            return CohortChoice(cohort, None, f"cohort {cohort.cohort_id}")
    newest = max(cohorts, key=lambda c: c.seq)
    return CohortChoice(
        None,
        RefusalCode.COHORT_SPENT,
        f"cohort budget spent: all {len(cohorts)} inbox cohorts already took part in {rounds} "
        f"round(s) each (newest {newest.cohort_id}); waiting for new data",
    )


def _inbox(merchant: MerchantConfig, instruction: TrainInstruction) -> Inbox:
    if merchant.inbox is None:
        raise ConfigError(
            f"merchant {merchant.id} has no inbox in its configuration; set merchant.inbox"
        )
    if instruction.planned_rounds < 1:
        raise ConfigError(
            f"planned rounds per cohort must be >= 1, got {instruction.planned_rounds}"
        )
    return Inbox(merchant.inbox, arrival=merchant.inbox_arrival, merchant_id=merchant.id)


def _training_frame(merchant: MerchantConfig, inbox: Inbox, cohort: Cohort) -> pd.DataFrame | None:
    """The cohort's events without the held-out customers, prepared for training."""
    frame = inbox.load([cohort.cohort_id])  # checked against the hash recorded at acceptance
    secret = load_merchant_secret(ensure_merchant_secret(merchant.state_dir).parent)
    mask = held_out(frame[CUSTOMER_ID], secret=secret, share=merchant.holdout_share)
    frame = frame.loc[~mask].reset_index(drop=True)
    return None if frame.empty else frame


def run_finetune_round(
    instruction: TrainInstruction, merchant: MerchantConfig, *, now: datetime | None = None
) -> MerchantReply:
    """Scan the inbox, pick a cohort, train on it or refuse (never raises expected failures).
    The merchant's ledger is opened (and verified) once for the whole round."""
    try:
        ledger = open_merchant_ledger(merchant)
    except FedshopError as exc:
        log.error("merchant %s fine-tuning failed: %s", merchant.id, exc.one_line())
        code = FailureCode.INTEGRITY if isinstance(exc, IntegrityError) else FailureCode.DATA
        return MerchantReply(Outcome.FAILED, merchant.id, code.value, exc.one_line())
    with ledger:
        return _finetune(instruction, merchant, ledger, now or datetime.now(UTC))


def _finetune(
    instruction: TrainInstruction, merchant: MerchantConfig, ledger: MerchantLedger, now: datetime
) -> MerchantReply:
    try:
        inbox = _inbox(merchant, instruction)
        report = inbox.scan(now=now)
        for bad in report.quarantined:
            log.warning("merchant %s: quarantined %s: %s", merchant.id, bad.name, bad.reason)
        choice = choose_cohort(
            inbox.cohorts(), releases_per_cohort(ledger), rounds=instruction.planned_rounds
        )
        if choice.cohort is None:
            assert choice.code is not None
            log.info("merchant %s: %s", merchant.id, choice.reason)
            return MerchantReply(Outcome.REFUSED, merchant.id, choice.code.value, choice.reason)
        frame = _training_frame(merchant, inbox, choice.cohort)
        if frame is None:
            reason = (
                f"no fresh data: cohort {choice.cohort.cohort_id} holds only held-out customers"
            )
            return MerchantReply(
                Outcome.REFUSED, merchant.id, RefusalCode.NO_FRESH_DATA.value, reason
            )
        data = TrainingData.of(period_log([frame], instruction.config.model))
    except FedshopError as exc:
        log.error("merchant %s fine-tuning failed: %s", merchant.id, exc.one_line())
        code = FailureCode.INTEGRITY if isinstance(exc, IntegrityError) else FailureCode.DATA
        return MerchantReply(Outcome.FAILED, merchant.id, code.value, exc.one_line())
    cohort = choice.cohort
    stream = replace(
        merchant,
        data=cohort.path,
        cohort=cohort.cohort_id,
        epsilon_cap=min(merchant.stream_epsilon_cap, merchant.epsilon_cap),
    )
    reply = run_merchant_round(instruction, stream, data=data, ledger=ledger)
    if reply.outcome is Outcome.REFUSED:
        return replace(reply, reason=f"cohort {cohort.cohort_id}: {reply.reason}")
    if reply.outcome is Outcome.TRAINED:
        return replace(reply, reason=f"trained on cohort {cohort.cohort_id}")
    return reply
