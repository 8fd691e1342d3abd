"""The merchant's own events as serving reads them: its data file plus accepted inbox cohorts.

Read-only: the inbox is scanned by the fine-tuning round, not here (client/inbox.py). A cheap
signature (the data file's size and mtime, the accepted cohort ids) tells the service when to
re-read, so personalisation follows new purchases without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from client.inbox import accepted_cohorts, read_cohort_file
from client.merchant import MerchantConfig
from common.errors import DataValidationError
from common.events import CUSTOMER_ID, MERCHANT_ID, REQUIRED_COLUMNS, TIMESTAMP, read_events

Signature = tuple[int, int, tuple[str, ...]]


@dataclass(frozen=True)
class MerchantEvents:
    """A snapshot of the merchant's events and the signature it was read at."""

    signature: Signature
    events: pd.DataFrame
    cohorts: tuple[str, ...]


def signature(merchant: MerchantConfig) -> Signature:
    try:
        info = merchant.data.stat()
    except FileNotFoundError:
        raise DataValidationError(
            "the merchant's data file does not exist", file=str(merchant.data)
        ) from None
    cohorts = () if merchant.inbox is None else accepted_cohorts(merchant.inbox)
    return info.st_size, info.st_mtime_ns, tuple(c for c, _, _ in cohorts)


def load_events(merchant: MerchantConfig) -> MerchantEvents:
    """Every event of this merchant, oldest first (each cohort checked against its hash)."""
    before = signature(merchant)
    frames = [read_events(merchant.data)[list(REQUIRED_COLUMNS)]]
    cohorts = [] if merchant.inbox is None else accepted_cohorts(merchant.inbox)
    for _, path, sha in cohorts:
        frames.append(read_cohort_file(path, sha)[list(REQUIRED_COLUMNS)])
    events = pd.concat(frames, ignore_index=True)
    events = events[events[MERCHANT_ID] == merchant.id]
    if events.empty:
        raise DataValidationError(
            f"no events of merchant {merchant.id!r}: nothing to recommend from",
            file=str(merchant.data),
            column=MERCHANT_ID,
        )
    events = events.sort_values([TIMESTAMP, CUSTOMER_ID], kind="stable").reset_index(drop=True)
    return MerchantEvents(before, events, tuple(c for c, _, _ in cohorts))
