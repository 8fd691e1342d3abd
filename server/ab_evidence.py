"""A/B results from merchants as online evidence for the promotion gate.

The platform asks every merchant for its evidence on a candidate (``query.abevidence``); each
answers with per-arm sufficient statistics only (counts and sums over its customers,
common/ab_stats.py), which add up across merchants. :func:`online_gate` then promotes the
candidate only if the pooled sample is large enough and the candidate is, with 95% confidence,
no worse than the serving version by more than ``tolerance`` on the chosen metric (the lower end
of the interval of candidate minus control is at least ``-tolerance``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import protocol as P
from common.ab_stats import (
    CANDIDATE_KEY,
    EVIDENCE_MESSAGE_TYPE,
    REPORTED,
    Evidence,
    compare,
    from_flat,
    pool,
    sample_problems,
)
from common.errors import ConfigError, FedshopError
from server.acceptance import short_reason
from server.exchange import exchange
from server.registry import GateDecision

log = logging.getLogger(__name__)


@dataclass
class EvidenceReport:
    """Each merchant's evidence, and who refused or failed (and why)."""

    candidate: int
    evidence: dict[str, Evidence] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def pooled(self) -> Evidence:
        return pool(self.evidence.values())


def evidence_messages(
    candidate: int, nodes: list[int], *, simulation_dir: Path | None = None
) -> list[Message]:
    config: dict[str, int | str] = {CANDIDATE_KEY: candidate}
    if simulation_dir is not None:
        config[P.SIMULATION_DIR] = str(simulation_dir)
    return [
        Message(
            content=RecordDict({P.CONFIG: ConfigRecord(config)}),  # type: ignore[arg-type]
            message_type=EVIDENCE_MESSAGE_TYPE,
            dst_node_id=node,
        )
        for node in nodes
    ]


def record_evidence(report: EvidenceReport, status: ConfigRecord, metrics: MetricRecord) -> None:
    """One merchant's answer; malformed evidence counts as a failure, never as data."""
    merchant = str(status[P.MERCHANT_ID])
    if str(status[P.OUTCOME]) != REPORTED:
        report.refused[merchant] = str(status[P.REASON])
        return
    try:
        report.evidence[merchant] = from_flat(dict(metrics), source=f"merchant {merchant}")
    except FedshopError as exc:
        report.failed[merchant] = exc.one_line()


def collect_evidence(
    grid: Grid, candidate: int, *, timeout_s: float = 300.0, simulation_dir: Path | None = None
) -> EvidenceReport:
    """Ask every connected merchant for its A/B evidence on ``candidate``."""
    nodes = sorted(grid.get_node_ids())
    sent = exchange(
        grid,
        evidence_messages(candidate, nodes, simulation_dir=simulation_dir),
        timeout_s=timeout_s,
    )
    report = EvidenceReport(candidate)
    for reply in sent.replies:
        if reply.has_error():
            report.failed[f"node-{reply.metadata.src_node_id}"] = short_reason(
                str(reply.error.reason)
            )
            continue
        status, metrics = reply.content[P.STATUS], reply.content[P.METRICS]
        assert isinstance(status, ConfigRecord) and isinstance(metrics, MetricRecord)
        record_evidence(report, status, metrics)
    for node in [*sent.restarted, *sent.unanswered]:
        report.failed[f"node-{node}"] = "no answer to the evidence request"
    return report


def online_gate(
    evidence: Evidence,
    *,
    metric: str = "hit_rate",
    tolerance: float = 0.0,
    min_customers: int = 100,
) -> GateDecision:
    """Promote only on enough evidence that the candidate is not worse by more than
    ``tolerance`` (the 95% interval's lower end of candidate minus control)."""
    if not tolerance >= 0:
        raise ConfigError(f"online gate tolerance must be >= 0, got {tolerance!r}")
    control, candidate = evidence["control"][metric], evidence["candidate"][metric]
    value, current = candidate.estimate().value, control.estimate().value
    too_small = sample_problems(evidence, min_customers)
    if too_small:
        reason = f"online A/B evidence too small ({too_small}); kept, not promoted"
        return GateDecision(False, metric, value, current, tolerance, reason)
    result = compare(metric, control, candidate)
    summary = (
        f"online A/B {metric}: candidate {value:.4g} vs serving {current:.4g}, difference "
        f"{result.difference:+.4g} [95% {result.low:+.4g}, {result.high:+.4g}], "
        f"p = {result.p_value:.3g}, tolerance {tolerance:g}"
    )
    if result.low >= -tolerance:
        return GateDecision(True, metric, value, current, tolerance, f"{summary}: promoted")
    return GateDecision(
        False, metric, value, current, tolerance, f"{summary}: may be worse; kept, not promoted"
    )
