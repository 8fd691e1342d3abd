"""Purchases joined to the responses that showed them, never twice; and fed to learning."""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.inbox import ArrivalMode, FileStatus, Inbox
from client.serving.ab_report import per_response
from client.serving.attribution import attribute
from client.serving.feedback import attribute_new_cohorts, record_purchases
from client.serving.store import Impression, ServingStore
from common.errors import DataValidationError
from common.events import validate_events, write_events

sys.path.insert(0, str(Path(__file__).parent / "support"))
from serving_world import make_world

T0 = datetime(2030, 3, 1, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)


def ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1e9)


def shown(id: str, at: datetime, customer: str, products: list[str]) -> Impression:
    return Impression(
        id=id,
        at_ns=ns(at),
        customer=customer,
        arm="control",
        version=1,
        candidate=None,
        products=products,
        scores=[1.0 - 0.1 * i for i in range(len(products))],
        known=True,
    )


def purchases(*rows: tuple[str, str, datetime], merchant: str = "m1") -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["customer_id", "product_id", "timestamp"])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    frame.insert(0, "merchant_id", merchant)
    frame = frame.assign(quantity=1.0, price=3.0, category="", department="", brand="")
    return validate_events(frame, source="test purchases")


def joins(store: ServingStore) -> dict[str, tuple[str | None, int | None]]:
    with store.connect() as conn:
        rows = conn.execute("SELECT customer, product, at_ns, impression, rank FROM purchases")
        return {f"{c}/{p}/{t}": (i, r) for c, p, t, i, r in rows}


@pytest.fixture()
def store(tmp_path: Path) -> ServingStore:
    store = ServingStore(tmp_path)
    store.add_impressions(
        [
            shown("r1", T0, "alice", ["a", "b", "c"]),
            shown("r2", T0 + timedelta(hours=1), "alice", ["d", "e"]),
            shown("r3", T0, "bob", ["b"]),
        ]
    )
    return store


def test_a_purchase_joins_the_latest_response_that_showed_it(store: ServingStore) -> None:
    later = T0 + timedelta(hours=2)
    counts = attribute(
        store,
        purchases(
            ("alice", "b", later),  # shown by r1 only: joins r1 at rank 2, though r2 is later
            ("alice", "x", later),  # never shown: joins alice's latest response, r2
            ("alice", "a", T0 + timedelta(days=8)),  # past r1's and r2's window
            ("alice", "a", T0 - timedelta(minutes=1)),  # bought before anything was shown
            ("carol", "b", later),  # nobody showed carol anything
            ("bob", "b", later),
        ),
        window=WEEK,
        source="test",
    )
    got = joins(store)
    assert got[f"alice/b/{ns(later)}"] == ("r1", 2)
    assert got[f"alice/x/{ns(later)}"] == ("r2", None)
    assert got[f"alice/a/{ns(T0 + timedelta(days=8))}"] == (None, None)
    assert got[f"alice/a/{ns(T0 - timedelta(minutes=1))}"] == (None, None)
    assert got[f"carol/b/{ns(later)}"] == (None, None)
    assert got[f"bob/b/{ns(later)}"] == ("r3", 1)
    assert (counts.purchases, counts.already_known, counts.joined, counts.shown) == (6, 0, 3, 2)


def test_the_same_purchase_is_never_joined_twice(store: ServingStore) -> None:
    later = T0 + timedelta(hours=3)
    one = purchases(("alice", "b", later))
    first = attribute(store, pd.concat([one, one]), window=WEEK, source="api")  # twice in a batch
    again = attribute(store, one, window=WEEK, source="inbox")  # and reported again later
    assert (first.purchases, first.already_known, first.joined) == (1, 1, 1)
    assert (again.purchases, again.already_known, again.joined) == (0, 1, 0)
    with store.connect() as conn:
        assert conn.execute("SELECT COUNT(*), MIN(source) FROM purchases").fetchone() == (1, "api")


def test_ndcg_and_revenue_of_one_response_by_hand(store: ServingStore) -> None:
    later = T0 + timedelta(minutes=30)
    attribute(
        store,
        purchases(("alice", "b", later), ("alice", "q", later), ("alice", "b", later + WEEK / 100)),
        window=WEEK,
        source="test",
    )
    with store.connect() as conn:
        responses = pd.read_sql_query("SELECT id, customer, arm, version FROM impressions", conn)
        joined = pd.read_sql_query(
            "SELECT impression AS id, product, rank, revenue FROM purchases", conn
        )
    row = per_response(responses, joined).set_index("id").loc["r1"]
    # r1 showed [a, b, c]; alice then bought b (twice) and q: relevant {b, q}, b at rank 2.
    assert row["hit"] == 1.0
    assert row["ndcg"] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert (row["revenue"], row["shown_revenue"]) == (9.0, 6.0)


def test_purchases_reach_the_inbox_once_whichever_way_they_come(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    merchant = replace(world.merchant, inbox_arrival=ArrivalMode.RENAMED)
    store = ServingStore(merchant.serving_dir)
    store.add_impressions([shown("r1", T0, "c1", ["p1", "p2"])])
    later = T0 + timedelta(hours=1)
    reported = purchases(("c1", "p2", later), ("c1", "p9", later), merchant=merchant.id)
    result = record_purchases(reported, merchant, store, source="api")
    assert result.inbox_file is not None and result.inbox_file.parent == merchant.inbox / "inbox"
    assert (result.counts.joined, result.counts.shown) == (2, 1)

    inbox = Inbox(merchant.inbox, arrival=ArrivalMode.RENAMED, merchant_id=merchant.id)
    (cohort,) = inbox.scan(now=later).accepted  # an ordinary cohort the fine-tuning round uses
    assert cohort.rows == 2
    # The shop's export job later delivers the same purchases plus a new one.
    export = pd.concat(
        [reported, purchases(("c1", "p1", later + timedelta(hours=1)), merchant=merchant.id)]
    )
    write_events(export, merchant.inbox / "inbox" / "export-0001.parquet")
    report = inbox.scan(now=later)
    (second,) = report.accepted
    assert second.rows == 1 and second.overlap_rows == 2  # the inbox trains on each event once
    joined = attribute_new_cohorts(merchant, store)
    assert {c: (n.purchases, n.already_known, n.shown) for c, n in joined.items()} == {
        cohort.cohort_id: (0, 2, 0),
        second.cohort_id: (1, 0, 1),
    }
    assert attribute_new_cohorts(merchant, store) == {}  # each cohort is joined once
    assert [d for _, d in inbox.deliveries()].count(FileStatus.ACCEPTED) == 2

    other = purchases(("c1", "p1", later), merchant="someone-else")
    with pytest.raises(DataValidationError, match="someone-else"):
        record_purchases(other, merchant, store, source="api")


def test_old_responses_are_forgotten_but_purchases_stay_known(store: ServingStore) -> None:
    later = T0 + timedelta(hours=2)
    attribute(store, purchases(("alice", "b", later)), window=WEEK, source="test")
    assert store.prune(ns(T0 + timedelta(minutes=30))) == 2  # r1 and r3, not r2
    counts = store.counts()
    assert (counts["impressions"], counts["shown"], counts["purchases"]) == (1, 2, 1)
    again = attribute(store, purchases(("alice", "b", later)), window=WEEK, source="test")
    assert (again.purchases, again.already_known) == (0, 1)


def test_retention_must_cover_the_attribution_window() -> None:
    from client.serving.config import ServingConfig
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="retention_days"):
        ServingConfig(retention_days=3, attribution_window_hours=168)
