"""Purchases back into serving and learning: joined to responses, then into the inbox.

Two ways in, one rule. Purchases the shop reports to the service (``POST /purchases`` or
``fedshop feedback --events FILE``) are validated like any event file, joined to the responses
that showed them (client/serving/attribution.py) and written into the merchant's inbox as an
ordinary event file, so the next fine-tuning round learns from what serving caused. Purchases
that reach the inbox another way (the shop's export job) are joined when their cohort is
accepted (:func:`attribute_new_cohorts`). The event key makes both paths meet: the attribution
store keeps a purchase once, and the inbox drops events it already accepted, so a purchase
reported both ways is neither joined nor trained on twice.

Responses nobody bought from stay in the merchant's serving database. Today's model samples its
negatives uniformly from the catalogue and does not read them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from client.inbox import accepted_cohorts, event_keys, read_cohort_file
from client.merchant import MerchantConfig
from client.serving.attribution import (
    AttributionCounts,
    attribute,
    cohorts_to_attribute,
    mark_attributed,
)
from client.serving.store import ServingStore
from common.errors import DataValidationError
from common.events import MERCHANT_ID, write_events

FEEDBACK_PREFIX = "feedback-"


@dataclass(frozen=True)
class FeedbackResult:
    counts: AttributionCounts
    inbox_file: Path | None  # None when the merchant has no inbox configured


def attribution_window(merchant: MerchantConfig) -> timedelta:
    return timedelta(hours=merchant.serving.attribution_window_hours)


def check_merchant_rows(frame: pd.DataFrame, merchant: MerchantConfig, source: str) -> None:
    """Every row is this merchant's; checked before any serving state is created or touched."""
    other = frame.index[frame[MERCHANT_ID] != merchant.id]
    if len(other):
        raise DataValidationError(
            f"merchant_id {frame.loc[other[0], MERCHANT_ID]!r}, but this is merchant "
            f"{merchant.id!r}",
            file=source,
            row=int(frame.index.get_loc(other[0])) + 1,
            column=MERCHANT_ID,
        )


def to_inbox(frame: pd.DataFrame, merchant: MerchantConfig) -> Path | None:
    """Drop ``frame`` into the inbox as one file (written aside, then renamed into place)."""
    if merchant.inbox is None:
        return None
    digest = hashlib.sha256(b"".join(sorted(event_keys(frame)))).hexdigest()[:16]
    target = merchant.inbox / "inbox" / f"{FEEDBACK_PREFIX}{digest}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_events(frame.reset_index(drop=True), target)
    return target


def record_purchases(
    frame: pd.DataFrame,
    merchant: MerchantConfig,
    store: ServingStore,
    *,
    source: str,
    now: datetime | None = None,
) -> FeedbackResult:
    """Join validated purchases (a canonical frame) to responses, then hand them to learning."""
    check_merchant_rows(frame, merchant, source)
    counts = attribute(store, frame, window=attribution_window(merchant), source=source, now=now)
    return FeedbackResult(counts, to_inbox(frame, merchant))


def attribute_new_cohorts(
    merchant: MerchantConfig, store: ServingStore, *, now: datetime | None = None
) -> dict[str, AttributionCounts]:
    """Join the purchases of inbox cohorts accepted since the last call (each cohort once)."""
    if merchant.inbox is None:
        return {}
    known = {cohort: (path, sha) for cohort, path, sha in accepted_cohorts(merchant.inbox)}
    done: dict[str, AttributionCounts] = {}
    for cohort in cohorts_to_attribute(store, list(known)):
        path, sha = known[cohort]
        events = read_cohort_file(path, sha)
        events = events[events[MERCHANT_ID] == merchant.id]
        done[cohort] = attribute(
            store, events, window=attribution_window(merchant), source=cohort, now=now
        )
        mark_attributed(store, cohort, now=now or datetime.now(UTC))
    return done
