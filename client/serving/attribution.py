"""Joining the merchant's purchases to the responses that showed them.

Rule (last touch, shown first): a purchase of product P by customer C at time t joins the latest
response to C in ``[t - window, t]`` that showed P; if none of C's responses in that window showed
P, it joins C's latest response in the window as a purchase the response did not show; with no
response in the window it joins none. Every purchase is stored once, keyed by the inbox's event
key (merchant, customer, product, timestamp), so a purchase reported twice (by the service's
feedback endpoint and again in an inbox file, or in two overlapping files) is joined once only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from client.inbox import event_keys
from client.serving.store import ServingStore
from common.events import CUSTOMER_ID, PRICE, PRODUCT_ID, QUANTITY, TIMESTAMP

_JOIN = """
WITH candidates AS (
    SELECT incoming.key AS key, i.id AS impression, s.rank AS rank,
           ROW_NUMBER() OVER (
               PARTITION BY incoming.key ORDER BY (s.rank IS NULL), i.at_ns DESC, i.id DESC
           ) AS pick
    FROM incoming
    JOIN impressions AS i
      ON i.customer = incoming.customer
     AND i.at_ns <= incoming.at_ns
     AND incoming.at_ns - i.at_ns <= :window
    LEFT JOIN shown AS s ON s.impression = i.id AND s.product = incoming.product
)
INSERT OR IGNORE INTO purchases
    (key, customer, product, at_ns, revenue, impression, rank, source, recorded_at)
SELECT incoming.key, incoming.customer, incoming.product, incoming.at_ns, incoming.revenue,
       c.impression, c.rank, :source, :recorded_at
FROM incoming LEFT JOIN candidates AS c ON c.key = incoming.key AND c.pick = 1
"""


@dataclass(frozen=True)
class AttributionCounts:
    """What one batch of purchases did: new ones stored, repeats ignored, joins made."""

    purchases: int
    already_known: int
    joined: int  # joined a response (shown or not)
    shown: int  # joined a response that showed the product


def _incoming_rows(purchases: pd.DataFrame) -> list[tuple[bytes, str, str, int, float]]:
    # nanoseconds, as in canonical frames: the event key must not depend on the time unit
    purchases = purchases.assign(**{TIMESTAMP: purchases[TIMESTAMP].dt.as_unit("ns")})
    keys = event_keys(purchases)
    stamps = purchases[TIMESTAMP].astype("int64").to_numpy()
    revenue = (purchases[PRICE] * purchases[QUANTITY]).to_numpy(dtype=np.float64)
    return list(
        zip(
            keys,
            purchases[CUSTOMER_ID].astype(str),
            purchases[PRODUCT_ID].astype(str),
            stamps.tolist(),
            revenue.tolist(),
            strict=True,
        )
    )


def attribute(
    store: ServingStore,
    purchases: pd.DataFrame,
    *,
    window: timedelta,
    source: str,
    now: datetime | None = None,
) -> AttributionCounts:
    """Store ``purchases`` (a canonical event frame) and join each new one to a response."""
    rows = _incoming_rows(purchases)
    window_ns = int(window.total_seconds() * 1e9)
    recorded_at = (now or datetime.now(UTC)).isoformat()
    with store.transaction() as conn:
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS incoming (key BLOB PRIMARY KEY, customer TEXT, "
            "product TEXT, at_ns INTEGER, revenue REAL) WITHOUT ROWID"
        )
        conn.execute("DELETE FROM incoming")
        conn.executemany("INSERT OR IGNORE INTO incoming VALUES (?,?,?,?,?)", rows)
        conn.execute("DELETE FROM incoming WHERE key IN (SELECT key FROM purchases)")
        new = int(conn.execute("SELECT COUNT(*) FROM incoming").fetchone()[0])
        conn.execute(_JOIN, {"window": window_ns, "source": source, "recorded_at": recorded_at})
        joined, shown = conn.execute(
            "SELECT COUNT(p.impression), COUNT(p.rank) FROM purchases AS p "
            "JOIN incoming USING (key)"
        ).fetchone()
        conn.execute("DELETE FROM incoming")
    return AttributionCounts(new, len(rows) - new, int(joined), int(shown))


def cohorts_to_attribute(store: ServingStore, cohort_ids: list[str]) -> list[str]:
    """The cohort ids not yet joined, in the given order."""
    with store.connect() as conn:
        done = {str(r[0]) for r in conn.execute("SELECT cohort_id FROM attributed_cohorts")}
    return [c for c in cohort_ids if c not in done]


def mark_attributed(store: ServingStore, cohort_id: str, *, now: datetime | None = None) -> None:
    with store.transaction() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO attributed_cohorts (cohort_id, at) VALUES (?,?)",
            (cohort_id, (now or datetime.now(UTC)).isoformat()),
        )
