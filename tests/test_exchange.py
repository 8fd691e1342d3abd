"""The platform's send-and-collect loop against a scripted grid: replies, a merchant that died
holding its message and came back, the timeout, a refused push."""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from server.exchange import exchange, stream_exchange


@dataclass
class ScriptedGrid:
    """Nodes answer at given poll counts; ``restart`` re-activates a node at a poll count."""

    answers_at: dict[int, int]  # node -> poll on which its reply appears
    restart: dict[int, int] = field(default_factory=dict)  # node -> poll on which it rejoins
    refuse_push: bool = False
    polls: int = 0
    sent: dict[str, int] = field(default_factory=dict)

    def get_nodes(self) -> list[Any]:
        return [
            SimpleNamespace(
                node_id=node,
                last_activated_at=(
                    "later" if node in self.restart and self.polls >= self.restart[node] else "t0"
                ),
            )
            for node in self.answers_at
        ]

    def push_messages(self, messages: list[Any]) -> list[str]:
        if self.refuse_push:
            return []
        ids = []
        for message in messages:
            msg_id = f"m{len(self.sent)}"
            ids.append(msg_id)
            self.sent[msg_id] = message.metadata.dst_node_id
        return ids

    def pull_messages(self, ids: list[str]) -> list[Any]:
        self.polls += 1
        replies = []
        for msg_id in ids:
            node = self.sent[msg_id]
            if self.polls >= self.answers_at[node]:
                replies.append(_stub(node=node, reply_to_message_id=msg_id))
        return replies


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _stub(**metadata: Any) -> Any:
    """Only the metadata the loop reads (a real Message needs a running Flower task)."""
    return SimpleNamespace(metadata=SimpleNamespace(**metadata))


def _messages(nodes: list[int]) -> list[Any]:
    return [_stub(dst_node_id=n) for n in nodes]


def _run(grid: ScriptedGrid, timeout_s: float = 60.0) -> Any:
    clock = FakeClock()
    out = exchange(
        grid,  # type: ignore[arg-type]
        _messages(sorted(grid.answers_at)),
        timeout_s=timeout_s,
        clock=clock,
        sleep=clock.sleep,
    )
    return out, clock.now


def _answered(out: Any) -> list[int]:
    return sorted(r.metadata.node for r in out.replies)


def test_collects_every_reply_and_stops_as_soon_as_all_are_in() -> None:
    out, waited = _run(ScriptedGrid(answers_at={1: 1, 2: 3, 3: 5}))
    assert _answered(out) == [1, 2, 3]
    assert out.restarted == [] and out.unanswered == []
    assert waited < 2.0  # backs off from 50 ms, never sleeps past the last reply


def test_a_node_that_restarted_holding_its_message_does_not_hold_up_the_round() -> None:
    # node 2 never answers (its message died with it) and rejoins on poll 4
    out, waited = _run(ScriptedGrid(answers_at={1: 1, 2: 10**9, 3: 2}, restart={2: 4}))
    assert _answered(out) == [1, 3]
    assert out.restarted == [2] and out.unanswered == []
    assert waited < 5.0  # not the 60 s round timeout


def test_silent_nodes_are_reported_at_the_timeout() -> None:
    out, waited = _run(ScriptedGrid(answers_at={1: 1, 2: 10**9}), timeout_s=30.0)
    assert _answered(out) == [1]
    assert out.unanswered == [2] and out.restarted == []
    assert 30.0 <= waited <= 31.0


def test_a_refused_push_reports_every_node_unanswered_without_waiting() -> None:
    out, waited = _run(ScriptedGrid(answers_at={1: 1, 2: 1}, refuse_push=True))
    assert out.replies == [] and out.unanswered == [1, 2] and waited == 0.0


def test_a_window_keeps_at_most_that_many_messages_out_and_builds_them_lazily() -> None:
    grid = ScriptedGrid(answers_at={node: node for node in range(1, 8)} | {8: 10**9})
    built: list[int] = []
    replied: list[int] = []
    most_alive = 0

    def messages():
        nonlocal most_alive
        for node in sorted(grid.answers_at):
            built.append(node)
            most_alive = max(most_alive, len(built) - len(replied))
            yield _stub(dst_node_id=node)

    clock = FakeClock()
    out = stream_exchange(
        grid,  # type: ignore[arg-type]
        messages(),
        on_reply=lambda reply: replied.append(reply.metadata.node),
        timeout_s=30.0,
        max_in_flight=3,
        clock=clock,
        sleep=clock.sleep,
    )
    assert sorted(replied) == list(range(1, 8)) and out.replies == []  # handed on, not kept
    assert out.unanswered == [8] and 30.0 <= clock.now <= 31.0
    assert most_alive <= 3 and built == list(range(1, 9))


def test_a_window_reports_messages_never_sent_before_the_timeout_as_unanswered() -> None:
    grid = ScriptedGrid(answers_at={1: 10**9, 2: 10**9, 3: 1})
    clock = FakeClock()
    out = stream_exchange(
        grid,  # type: ignore[arg-type]
        _messages([1, 2, 3]),
        on_reply=lambda reply: None,
        timeout_s=5.0,
        max_in_flight=2,
        clock=clock,
        sleep=clock.sleep,
    )
    assert sorted(out.unanswered) == [1, 2, 3] and list(grid.sent.values()) == [1, 2]


def test_without_a_window_every_message_goes_out_at_once_a_batch_at_a_time() -> None:
    from server.exchange import PUSH_BATCH

    nodes = list(range(1, 2 * PUSH_BATCH + 6))
    grid = ScriptedGrid(answers_at={node: 2 for node in nodes})
    pushes: list[int] = []
    push = grid.push_messages

    def counted(messages: list[Any]) -> list[str]:
        pushes.append(len(messages))
        return push(messages)

    grid.push_messages = counted  # type: ignore[method-assign]
    out, waited = _run(grid)
    assert _answered(out) == nodes and pushes == [PUSH_BATCH, PUSH_BATCH, 5]
    assert waited == 0.0  # no wait between batches


def test_nodes_are_listed_for_restarts_at_most_once_a_second() -> None:
    """Listing nodes costs O(merchants) in Flower's simulation grid: not on every poll."""
    grid = ScriptedGrid(answers_at={1: 1, 2: 10**9})
    listed = []
    get_nodes = grid.get_nodes
    grid.get_nodes = lambda: listed.append(grid.polls) or get_nodes()  # type: ignore[method-assign]
    out, waited = _run(grid, timeout_s=30.0)
    assert out.unanswered == [2] and grid.polls > 30
    assert len(listed) <= 2 + waited


def test_replies_are_polled_for_within_a_twentieth_of_the_time_waited() -> None:
    from server.exchange import poll_wait

    assert poll_wait(0.0) == 0.05 and poll_wait(0.5) == 0.05
    assert poll_wait(4.0) == pytest.approx(0.2)
    assert poll_wait(10.0) == 0.5 and poll_wait(600.0) == 0.5
    polls, t = 0, 0.0
    while t < 10.0:
        t += poll_wait(t)
        polls += 1
    assert 60 <= polls <= 75  # the cost docs/transport.md states: about 70 in a round's first 10 s


def test_a_reply_pulled_before_its_parts_arrive_is_asked_for_again_after_50_ms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower's HTTP grid (the platform's in a deployment) retries missing parts quickly; the
    installed Flower's pull functions take every setting that common/flower_waits passes."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    from common import flower_waits
    from server.exchange import quicker_reply_pulls

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        params = inspect.signature(fn).parameters
        assert set(flower_waits.LOOPBACK_RETRIES) <= set(params)
        assert params["initial_backoff"].default == 1  # what the retries are quicker than

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(inflatable_utils, "pull_objects", lambda *a, **kw: calls.append(kw) or {})
    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)
    quicker_reply_pulls()
    http_grid.pull_objects(["a"], bytes)
    http_grid.pull_objects(["a"], bytes, backoff_cap=7.0)  # a caller's own value wins
    assert calls == [
        {"initial_backoff": 0.05, "backoff_cap": 0.5, "max_tries_per_object": None},
        {"initial_backoff": 0.05, "backoff_cap": 7.0, "max_tries_per_object": None},
    ]
    patched = http_grid.pull_objects
    quicker_reply_pulls()  # only once
    assert http_grid.pull_objects is patched
    assert not flower_waits.quicken_object_pulls(types.ModuleType("other"), {})  # not Flower's


def test_the_merchant_retries_missing_parts_quickly_towards_the_platform_only_at_first() -> None:
    from common.flower_waits import LOOPBACK_RETRIES, REMOTE_RETRIES

    assert REMOTE_RETRIES == {"initial_backoff": 0.05}  # Flower's cap and tries stay
    assert LOOPBACK_RETRIES["backoff_cap"] == 0.5
