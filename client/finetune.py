"""A fine-tuning round on the merchant's newest inbox cohort (message type ``train.finetune``).

The merchant scans its inbox, picks the newest accepted cohort that has not yet taken part in
``request.planned_rounds`` releases (the number of fine-tuning rounds a stream cohort may join),
and trains on that cohort alone through :func:`client.merchant_round.run_merchant_round` with
the cohort as the ledger's ``cohort`` and ``stream_epsilon_cap`` as its cap. Event-level
accounting is then per cohort (each event sits in exactly one cohort); customer-level
accounting composes every release of the merchant. Customer histories are built from the
cohort's own events only, so a release depends on no event outside its cohort. Older events are
not replayed for the same reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.inbox import Cohort, Inbox
from client.merchant import MerchantConfig
from client.merchant_round import TrainReply, TrainRequest, run_merchant_round
from common import protocol as P
from common.errors import ConfigError, FedshopError
from common.keys import load_signing_key
from common.ledger import MerchantLedger
from common.protocol import Outcome

log = logging.getLogger(__name__)

FINETUNE_ACTION = "finetune"
MESSAGE_TYPE = f"train.{FINETUNE_ACTION}"
NO_FRESH_DATA = "no fresh data"
COHORT_SPENT = "cohort budget spent"


@dataclass(frozen=True)
class CohortChoice:
    """The cohort to train on, or ``None`` with a sentence saying why there is none."""

    cohort: Cohort | None
    reason: str


def releases_per_cohort(merchant: MerchantConfig) -> dict[str, int]:
    """How many signed releases each cohort already took part in (from the merchant's ledger)."""
    if not merchant.ledger_path.exists():
        return {}
    with MerchantLedger.open(
        merchant.ledger_path,
        merchant_id=merchant.id,
        signing_key=load_signing_key(merchant.signing_key),
    ) as ledger:
        counts: dict[str, int] = {}
        for entry in ledger.entries():
            counts[entry.release.cohort] = counts.get(entry.release.cohort, 0) + 1
    return counts


def choose_cohort(cohorts: list[Cohort], used: dict[str, int], *, rounds: int) -> CohortChoice:
    """Newest cohort with rounds left: recency matters most for an online model."""
    if not cohorts:
        return CohortChoice(None, f"{NO_FRESH_DATA}: the inbox has no accepted cohort yet")
    for cohort in sorted(cohorts, key=lambda c: c.seq, reverse=True):
        if used.get(cohort.cohort_id, 0) < rounds:
            return CohortChoice(cohort, f"cohort {cohort.cohort_id} ({cohort.rows} events)")
    newest = max(cohorts, key=lambda c: c.seq)
    return CohortChoice(
        None,
        f"{COHORT_SPENT}: all {len(cohorts)} inbox cohorts already took part in {rounds} "
        f"round(s) each (newest {newest.cohort_id}); waiting for new data",
    )


def _check(merchant: MerchantConfig, request: TrainRequest) -> Inbox:
    if merchant.inbox is None:
        raise ConfigError(
            f"merchant {merchant.id} has no inbox in its configuration; set merchant.inbox"
        )
    cap = merchant.stream_epsilon_cap
    if not (math.isfinite(cap) and cap > 0):
        raise ConfigError(f"merchant.stream_epsilon_cap must be > 0, got {cap!r}")
    if request.planned_rounds < 1:
        raise ConfigError(f"planned rounds per cohort must be >= 1, got {request.planned_rounds}")
    return Inbox(merchant.inbox, arrival=merchant.inbox_arrival, merchant_id=merchant.id)


def run_finetune_round(
    request: TrainRequest, merchant: MerchantConfig, *, now: datetime | None = None
) -> TrainReply:
    """Scan the inbox, pick a cohort, train on it or refuse (never raises expected failures)."""
    try:
        inbox = _check(merchant, request)
        report = inbox.scan(now=now or datetime.now(UTC))
        for bad in report.quarantined:
            log.warning("merchant %s: quarantined %s: %s", merchant.id, bad.name, bad.reason)
        choice = choose_cohort(
            inbox.cohorts(), releases_per_cohort(merchant), rounds=request.planned_rounds
        )
        if choice.cohort is None:
            log.info("merchant %s: %s", merchant.id, choice.reason)
            return TrainReply(Outcome.REFUSED, merchant.id, choice.reason)
        inbox.load([choice.cohort.cohort_id])  # checks the file against its recorded hash
    except FedshopError as exc:
        log.error("merchant %s fine-tuning failed: %s", merchant.id, exc.one_line())
        return TrainReply(Outcome.FAILED, merchant.id, exc.one_line())
    cohort = choice.cohort
    stream = replace(
        merchant,
        data=cohort.path,
        cohort=cohort.cohort_id,
        epsilon_cap=min(merchant.stream_epsilon_cap, merchant.epsilon_cap),
    )
    reply = run_merchant_round(request, stream)
    if reply.outcome is Outcome.REFUSED:
        reason = f"{COHORT_SPENT}: cohort {cohort.cohort_id}: {reply.reason}"
        return replace(reply, reason=reason)
    if reply.outcome is Outcome.TRAINED:
        return replace(reply, reason=f"trained on {choice.reason}")
    return reply


def reply_content(reply: TrainReply) -> RecordDict:
    """The reply message's content, with the same keys as the offline ``train`` action."""
    status = {
        P.OUTCOME: reply.outcome.value,
        P.REASON: reply.reason,
        P.MERCHANT_ID: reply.merchant_id,
    }
    if reply.ledger_entry is not None:
        status[P.LEDGER_ENTRY] = reply.ledger_entry
    content = RecordDict()
    content[P.STATUS] = ConfigRecord(status)  # type: ignore[arg-type]
    content[P.METRICS] = MetricRecord(reply.metrics)  # type: ignore[arg-type]
    if reply.arrays is not None:
        content[P.ARRAYS] = P.to_array_record(reply.arrays)
    return content
