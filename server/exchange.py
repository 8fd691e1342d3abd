"""Send one round's messages and collect the replies, noticing merchants that restarted.

Flower answers for a node that went offline (an error reply), but not for one that died
holding a pulled message and came back under the same node id before the platform looked:
the SuperLink then lists it online again and the lost message would keep the round waiting
for the whole round timeout. A node's activation time changes when it comes back, so a
pending node whose activation time differs from the one seen at send time has lost its
message: it is reported as restarted and the round goes on without it.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from common.flower_waits import LOOPBACK_RETRIES, quicken_object_pulls

# Replies are polled for every 50 ms, then every twentieth of the time waited so far, at most
# every 0.5 s: a reply is seen within 5 % of the time it took (at least 50 ms, at most 0.5 s
# later), at about 70 polls in a round's first 10 s and two a second after that. Each poll
# is one request to the platform's own SuperLink on 127.0.0.1, not to the merchants.
FIRST_POLL_S = 0.05
POLL_FRACTION = 0.05
MAX_POLL_S = 0.5
PUSH_BATCH = 32  # messages built and pushed at once
# How often to look for restarted nodes: listing nodes costs O(merchants) (Flower's
# simulation grid deep-copies every node's record), so not on every poll.
RESTART_CHECK_S = 1.0


@dataclass
class Exchange:
    replies: list[Message] = field(default_factory=list)
    restarted: list[int] = field(default_factory=list)  # node ids whose message was lost
    unanswered: list[int] = field(default_factory=list)  # node ids still silent at the timeout


def activations(grid: Grid) -> dict[int, str]:
    """Each online node's last activation time (empty where the grid does not say)."""
    return {int(n.node_id): str(n.last_activated_at or "") for n in grid.get_nodes()}


def exchange(
    grid: Grid,
    messages: Sequence[Message],
    *,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Exchange:
    """Push ``messages`` and pull their replies until all are in, a destination restarted, or
    ``timeout_s`` passed. Polls quickly at first and backs off to twice a second
    (:func:`poll_wait`)."""
    result = Exchange()
    gone = stream_exchange(
        grid,
        messages,
        on_reply=result.replies.append,
        timeout_s=timeout_s,
        max_in_flight=None,
        clock=clock,
        sleep=sleep,
    )
    result.restarted, result.unanswered = gone.restarted, gone.unanswered
    return result


def stream_exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    on_reply: Callable[[Message], None],
    timeout_s: float,
    max_in_flight: int | None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Exchange:
    """Like :func:`exchange`, but each reply goes to ``on_reply`` as it is pulled and is not
    kept. ``messages`` is read lazily and pushed ``PUSH_BATCH`` at a time, so a generator keeps
    only that many instructions (each a copy of the model) alive here; ``max_in_flight``
    (None: no limit) also bounds the messages pushed and not yet answered, for a grid that
    keeps them in this process (Flower's simulation engine). The returned Exchange has no
    replies."""
    quicker_reply_pulls()
    seen = activations(grid)
    deadline = clock() + timeout_s
    source = iter(messages)
    exhausted = False
    checked = clock()
    result = Exchange()
    pending: dict[str, int] = {}  # message id -> destination node
    waiting_since = clock()
    while True:
        room = PUSH_BATCH if max_in_flight is None else max(0, max_in_flight - len(pending))
        take = min(room, PUSH_BATCH)
        batch = [] if exhausted else list(itertools.islice(source, take))
        exhausted = exhausted or len(batch) < take
        if batch:
            _push(grid, batch, pending, result)
        if not pending:
            if exhausted:
                break
            continue
        for reply in grid.pull_messages(list(pending)):
            if pending.pop(reply.metadata.reply_to_message_id, None) is not None:
                on_reply(reply)
        if pending and clock() - checked >= RESTART_CHECK_S:
            checked = clock()
            now_active = activations(grid)
            for msg_id, node in list(pending.items()):
                current = now_active.get(node)
                if current and current != seen.get(node, ""):
                    result.restarted.append(node)
                    del pending[msg_id]
        if clock() >= deadline:
            break
        can_push = not exhausted and (max_in_flight is None or len(pending) < max_in_flight)
        if can_push:
            waiting_since = clock()  # more to send now: no sleep
        elif pending:
            sleep(poll_wait(clock() - waiting_since))
    result.unanswered.extend(pending.values())
    result.unanswered.extend(message.metadata.dst_node_id for message in source)
    return result


def poll_wait(waited_s: float) -> float:
    """Seconds to sleep before the next poll for replies, ``waited_s`` after the last push."""
    return min(MAX_POLL_S, max(FIRST_POLL_S, POLL_FRACTION * waited_s))


HTTP_GRID_MODULE = "flwr.superlink.grid.http_grid"


def quicker_reply_pulls() -> None:
    """A reply is often pulled before the merchant has pushed all its parts: Flower's HTTP grid
    (the platform's in a deployment; loaded only there) asks for them again after 50 ms
    instead of 1 s (common/flower_waits.py)."""
    module = sys.modules.get(HTTP_GRID_MODULE)
    if module is not None:
        quicken_object_pulls(module, LOOPBACK_RETRIES)


def _push(grid: Grid, batch: list[Message], pending: dict[str, int], result: Exchange) -> None:
    ids = list(grid.push_messages(batch))
    nodes = [message.metadata.dst_node_id for message in batch]
    if len(ids) != len(nodes):  # Flower returns nothing when the whole push was refused
        result.unanswered.extend(nodes)
        return
    for msg_id, node in zip(ids, nodes, strict=True):
        if msg_id:
            pending[msg_id] = node
        else:  # and no id for a single message it could not push
            result.unanswered.append(node)
