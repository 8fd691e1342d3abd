"""Send one round's messages and collect the replies, noticing merchants that restarted.

Flower answers for a node that went offline (an error reply), but not for one that died
holding a pulled message and came back under the same node id before the platform looked:
the SuperLink then lists it online again and the lost message would keep the round waiting
for the whole round timeout. A node's activation time changes when it comes back, so a
pending node whose activation time differs from the one seen at send time has lost its
message: it is reported as restarted and the round goes on without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL_S = 0.05
MAX_POLL_S = 1.0


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
    ``timeout_s`` passed. Polls quickly at first and backs off to once a second."""
    seen = activations(grid)
    ids = list(grid.push_messages(messages))
    nodes = [message.metadata.dst_node_id for message in messages]
    if len(ids) != len(nodes):  # Flower returns nothing when the whole push was refused
        return Exchange(unanswered=nodes)
    sent = list(zip(ids, nodes, strict=True))
    # and no id for a single message it could not push
    result = Exchange(unanswered=[node for msg_id, node in sent if not msg_id])
    pending = {msg_id: node for msg_id, node in sent if msg_id}
    deadline = clock() + timeout_s
    wait = FIRST_POLL_S
    while pending:
        for reply in grid.pull_messages(list(pending)):
            if pending.pop(reply.metadata.reply_to_message_id, None) is not None:
                result.replies.append(reply)
        if not pending:
            break
        now_active = activations(grid)
        for msg_id, node in list(pending.items()):
            current = now_active.get(node)
            if current and current != seen.get(node, ""):
                result.restarted.append(node)
                del pending[msg_id]
        if not pending or clock() >= deadline:
            break
        sleep(wait)
        wait = min(wait * 2, MAX_POLL_S)
    result.unanswered.extend(pending.values())
    return result
