"""Evaluation run by the merchants: send models, combine the sums and counts that come back.

The platform never holds a customer's history: it names parts of the merchants' held-out data
(common.protocol.EvalPart) and models by label; each merchant scores them on its own events
and replies with metric sums and counts. Overall figures are case-weighted means over the
merchants that answered; per-merchant figures are each merchant's own means.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from common.errors import IntegrityError
from common.metric_sums import MetricSums, combine
from common.protocol import EVALUATE, EvalPart, EvaluateInstruction, EvaluationReply, Outcome
from server.acceptance import short_reason
from server.exchange import stream_exchange

log = logging.getLogger(__name__)


@dataclass
class EvaluationOutcome:
    """Sums per merchant, and who refused (nothing held out) or failed."""

    sums: dict[str, Mapping[EvalPart, Mapping[str, MetricSums]]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def overall(self, part: EvalPart, label: str) -> MetricSums:
        return combine(  # in merchant order, not arrival order: the same sum in every run
            by_part[part][label]
            for _merchant, by_part in sorted(self.sums.items())
            if part in by_part and label in by_part[part]
        )

    def means(self, part: EvalPart, label: str) -> dict[str, float]:
        """Case-weighted means over every merchant that scored ``label`` on ``part``."""
        return self.overall(part, label).means()

    def per_merchant(self, part: EvalPart, label: str) -> dict[str, dict[str, float]]:
        return {
            merchant: by_part[part][label].means()
            for merchant, by_part in sorted(self.sums.items())
            if part in by_part and label in by_part[part]
        }

    def cases(self, part: EvalPart, label: str) -> float:
        return self.overall(part, label).cases


def federated_evaluate(
    grid: Grid,
    nodes: Sequence[int],
    instruction: EvaluateInstruction,
    *,
    timeout_s: float,
    name_of: Callable[[int], str],
    max_in_flight: int | None = None,
) -> EvaluationOutcome:
    """Ask ``nodes`` to score ``instruction``'s models, at most ``max_in_flight`` at a time
    (None: all at once); combine the (small) sums as they come back."""
    outcome = EvaluationOutcome()

    def record(message: Message) -> None:
        sender = name_of(message.metadata.src_node_id)
        if message.has_error():
            outcome.failed[sender] = short_reason(str(message.error.reason))
            return
        try:
            reply = EvaluationReply.from_content(message.content, instruction.tasks)
        except IntegrityError as exc:
            outcome.failed[sender] = f"unreadable evaluation reply: {exc.one_line()}"
            return
        if reply.outcome is Outcome.TRAINED:
            outcome.sums[reply.merchant_id] = reply.sums
        elif reply.outcome is Outcome.REFUSED:
            outcome.refused[reply.merchant_id] = reply.reason
        else:
            outcome.failed[reply.merchant_id] = reply.reason

    messages = (  # built as the window opens: each holds a copy of the models
        Message(content=instruction.to_content(), message_type=EVALUATE, dst_node_id=n)
        for n in nodes
    )
    sent = stream_exchange(
        grid, messages, on_reply=record, timeout_s=timeout_s, max_in_flight=max_in_flight
    )
    for node in [*sent.restarted, *sent.unanswered]:
        outcome.failed[name_of(node)] = "no evaluation reply"
    for merchant, reason in sorted(outcome.failed.items()):
        log.warning("evaluation: merchant %s failed: %s", merchant, reason)
    return outcome
