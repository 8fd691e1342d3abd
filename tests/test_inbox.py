"""Merchant inbox: validation, quarantine, idempotent re-delivery, crash safety, replay."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from client.inbox import ArrivalMode, FileStatus, Inbox
from common.errors import ConfigError, IntegrityError, NotFoundError

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HEADER = "merchant_id,customer_id,product_id,timestamp,quantity,price,category,department,brand\n"


def csv_text(customers: range, day: int = 1, merchant: str = "m1") -> str:
    lines = [
        f"{merchant},c{c},p{c % 7},2026-01-{day:02d}T10:{c % 60:02d}:00Z,1,2.5,cat,dep,brand\n"
        for c in customers
    ]
    return HEADER + "".join(lines)


def drop(inbox: Inbox, name: str, text: str) -> Path:
    path = inbox.inbox_dir / name
    path.write_text(text)
    return path


def open_inbox(root: Path) -> Inbox:
    return Inbox(root, arrival=ArrivalMode.RENAMED)


def test_good_file_becomes_cohort_and_loads(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    drop(inbox, "a.csv", csv_text(range(10)))
    report = inbox.scan(now=NOW)
    assert [c.cohort_id for c in report.accepted] == ["stream-000001"]
    assert report.accepted[0].rows == 10
    assert not (inbox.inbox_dir / "a.csv").exists()
    frame = inbox.load(["stream-000001"])
    assert len(frame) == 10
    assert str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert sorted(frame["customer_id"]) == sorted(f"c{i}" for i in range(10))


def test_bad_file_is_quarantined_with_reason(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    bad = csv_text(range(3)).replace(",1,2.5,", ",-1,2.5,", 1)
    drop(inbox, "bad.csv", bad)
    drop(inbox, "notes.txt", "hello")
    report = inbox.scan(now=NOW)
    assert report.accepted == ()
    assert {q.name for q in report.quarantined} == {"bad.csv", "notes.txt"}
    reason = (inbox.quarantine_dir / "bad.csv.reason.txt").read_text()
    assert "row 1" in reason and "quantity" in reason
    assert "unsupported file type" in (inbox.quarantine_dir / "notes.txt.reason.txt").read_text()
    assert (inbox.quarantine_dir / "bad.csv").read_text() == bad
    assert inbox.cohorts() == []
    assert list(inbox.inbox_dir.iterdir()) == []


def test_redelivery_is_idempotent(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    text = csv_text(range(5))
    drop(inbox, "day1.csv", text)
    inbox.scan(now=NOW)
    drop(inbox, "day1-again.csv", text)
    report = inbox.scan(now=NOW)
    assert report.duplicates == ("day1-again.csv",) and report.accepted == ()
    assert [c.rows for c in inbox.cohorts()] == [5]
    assert inbox.deliveries() == [
        ("day1.csv", FileStatus.ACCEPTED),
        ("day1-again.csv", FileStatus.DUPLICATE),
    ]


def test_overlapping_events_are_not_counted_twice(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    drop(inbox, "a.csv", csv_text(range(0, 10)))
    inbox.scan(now=NOW)
    drop(inbox, "b.csv", csv_text(range(5, 15)))  # rows 5-9 already accepted
    (cohort,) = inbox.scan(now=NOW).accepted
    assert (cohort.rows, cohort.overlap_rows) == (5, 5)
    drop(inbox, "c.csv", csv_text(range(0, 15)).replace("\n", "\r\n"))  # new bytes, known events
    report = inbox.scan(now=NOW)
    assert report.overlaps == ("c.csv",)
    all_events = inbox.load([c.cohort_id for c in inbox.cohorts()])
    assert len(all_events) == 15 and not all_events.duplicated(["customer_id"]).any()


def test_stable_mode_waits_for_size_to_settle(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path)  # ArrivalMode.STABLE
    path = drop(inbox, "a.csv", csv_text(range(3)))
    drop(inbox, ".b.csv", csv_text(range(3)))
    drop(inbox, "c.csv.part", csv_text(range(3)))
    assert inbox.scan(now=NOW).waiting == ("a.csv",)
    with path.open("a") as handle:  # still being written
        handle.write(csv_text(range(3, 6)).split("\n", 1)[1])
    os.utime(path, ns=(1, 2))
    assert inbox.scan(now=NOW).waiting == ("a.csv",)
    report = inbox.scan(now=NOW)
    assert report.waiting == () and report.accepted[0].rows == 6
    assert sorted(p.name for p in inbox.inbox_dir.iterdir()) == [".b.csv", "c.csv.part"]


class Crash(BaseException):
    pass


@pytest.mark.parametrize("step", ["after_parquet", "before_commit", "after_commit"])
def test_crash_at_each_step_neither_loses_nor_double_counts(tmp_path: Path, step: str) -> None:
    inbox = open_inbox(tmp_path)
    drop(inbox, "a.csv", csv_text(range(4)))
    inbox.scan(now=NOW)
    drop(inbox, "b.csv", csv_text(range(4, 10)))

    def crash(at: str) -> None:
        if at == step:
            raise Crash(at)

    inbox._fault_hook = crash
    with pytest.raises(Crash):
        inbox.scan(now=NOW)
    restarted = open_inbox(tmp_path)  # removes a stray cohort file, if any
    committed = step == "after_commit"
    assert len(restarted.cohorts()) == (2 if committed else 1)
    assert (tmp_path / "accepted" / "stream-000002.parquet").exists() == committed
    restarted.scan(now=NOW)
    assert [(c.cohort_id, c.rows) for c in restarted.cohorts()] == [
        ("stream-000001", 4),
        ("stream-000002", 6),
    ]
    assert list(restarted.inbox_dir.iterdir()) == []
    assert [s for _, s in restarted.deliveries()] == [FileStatus.ACCEPTED, FileStatus.ACCEPTED]
    assert len(restarted.load(["stream-000001", "stream-000002"])) == 10


def test_crash_after_quarantine_commit_finishes_the_move(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    drop(inbox, "bad.csv", "not,a,schema\n1,2,3\n")

    def crash(at: str) -> None:
        if at == "quarantine_after_commit":
            raise Crash(at)

    inbox._fault_hook = crash
    with pytest.raises(Crash):
        inbox.scan(now=NOW)
    report = open_inbox(tmp_path).scan(now=NOW)
    assert [q.name for q in report.quarantined] == ["bad.csv"]
    assert (tmp_path / "quarantine" / "bad.csv.reason.txt").exists()
    assert [s for _, s in open_inbox(tmp_path).deliveries()] == [FileStatus.QUARANTINED]


def test_changed_cohort_file_is_detected(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    drop(inbox, "a.csv", csv_text(range(3)))
    (cohort,) = inbox.scan(now=NOW).accepted
    with cohort.path.open("ab") as handle:
        handle.write(b"x")
    with pytest.raises(IntegrityError, match=r"stream-000001\.parquet changed"):
        inbox.load([cohort.cohort_id])
    with pytest.raises(NotFoundError, match="stream-000009"):
        inbox.load(["stream-000009"])


def test_replay_sample_is_bounded_seeded_and_older(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    for day, customers in ((1, range(0, 20)), (2, range(20, 30)), (3, range(30, 40))):
        drop(inbox, f"d{day}.csv", csv_text(customers, day=day))
        inbox.scan(now=NOW)
    first = inbox.replay_sample(12, rng=np.random.default_rng(7), before="stream-000003")
    again = inbox.replay_sample(12, rng=np.random.default_rng(7), before="stream-000003")
    assert len(first) == 12 and first.equals(again)
    ids = {int(c[1:]) for c in first["customer_id"]}
    assert ids <= set(range(30)) and not first.duplicated(["customer_id"]).any()
    assert len(inbox.replay_sample(1000, rng=np.random.default_rng(1))) == 40
    assert len(inbox.replay_sample(0, rng=np.random.default_rng(1))) == 0
    with pytest.raises(ConfigError, match="-1"):
        inbox.replay_sample(-1, rng=np.random.default_rng(1))


def test_other_merchants_events_are_quarantined(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path, arrival=ArrivalMode.RENAMED, merchant_id="m1")
    text = csv_text(range(3)) + csv_text(range(3, 4), merchant="m2").split("\n", 1)[1]
    drop(inbox, "mixed.csv", text)
    drop(inbox, "mine.csv", csv_text(range(5, 8)))
    report = inbox.scan(now=NOW)
    assert [c.rows for c in report.accepted] == [3]
    (quarantined,) = report.quarantined
    assert "'m2'" in quarantined.reason and "row 4" in quarantined.reason
