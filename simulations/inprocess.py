"""A Flower Grid that delivers each message to a ClientApp in this process, at once.

A transport only: the platform's round loop, acceptance policy and federated evaluation, and
the merchants' ClientApp are exactly the production code; what goes away is Ray's start-up
and the per-message process cost. Benchmarks and tests that run many short federations use it.
Messages travel as Flower ``Message`` objects, errors in a ClientApp come back as Flower error
replies, as they would from a SuperNode.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_EXCEPTION = 1  # an error code of our own for a ClientApp that raised


class InProcessGrid(Grid):
    """Nodes ``1..n`` with the given node configs; ``active`` limits who is connected."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        *,
        active: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            i + 1: Context(
                run_id=1,
                node_id=i + 1,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config={},
            )
            for i, cfg in enumerate(node_configs)
        }
        self.active = active
        _claim_task_identity()
        self._replies: dict[str, Message] = {}
        self.messages_sent = 0

    def set_run(self, run: Any) -> None:  # pragma: no cover - nothing to set
        return None

    @property
    def run(self) -> Any:  # pragma: no cover - Flower's Run is not needed in process
        raise NotImplementedError("an in-process grid has no Flower run")

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        nodes = sorted(self.contexts)
        if self.active is None:
            return nodes
        allowed = set(self.active())
        return [n for n in nodes if n in allowed]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = self.client_app(message, context)
            except Exception as exc:  # a ClientApp that raises answers with an error reply
                reason = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                reply = Message(Error(code=CLIENT_APP_EXCEPTION, reason=reason), reply_to=message)
            self._replies[message_id] = reply
            self.messages_sent += 1
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


def _claim_task_identity() -> None:
    """Messages stamp the sending task's identity; in process, this process is the ServerApp
    (what Flower's runtime sets before it runs a ServerApp)."""
    if TaskIdentity._run_id is None:
        TaskIdentity.run_id = 1
    if TaskIdentity._node_id is None:
        TaskIdentity.node_id = SUPERLINK_NODE_ID
    if TaskIdentity._task_id is None:
        TaskIdentity.task_id = 0


def simulation_grid(
    client_app: ClientApp, merchants: int, *, active: Callable[[], Iterable[int]] | None = None
) -> InProcessGrid:
    """Nodes configured like Flower's simulation engine configures its virtual nodes."""
    return InProcessGrid(
        client_app,
        [{"partition-id": i, "num-partitions": merchants} for i in range(merchants)],
        active=active,
    )
