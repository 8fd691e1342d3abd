"""The merchant's answer to a request for A/B evidence (``query.abevidence``).

The platform names a candidate version; the merchant joins its newest purchases, computes its
A/B report for that candidate and answers with the per-arm sufficient statistics only
(common/ab_stats.py): counts and sums over customers, never a customer id, a response or a
purchase. With no A/B test of that candidate it answers with empty evidence.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.merchant import MerchantConfig
from client.serving.ab_report import ab_report
from client.serving.feedback import attribute_new_cohorts, attribution_window
from client.serving.store import ServingStore
from common import protocol as P
from common.ab_stats import CANDIDATE_KEY, REFUSED, REPORTED, to_flat
from common.errors import FedshopError

log = logging.getLogger(__name__)


def evidence_reply(config: ConfigRecord, merchant: MerchantConfig) -> RecordDict:
    status: dict[str, str] = {P.MERCHANT_ID: merchant.id}
    evidence: dict[str, float] = {}
    try:
        candidate = int(str(config[CANDIDATE_KEY]))
        store = ServingStore(merchant.serving_dir)
        attribute_new_cohorts(merchant, store)
        report = ab_report(
            store,
            window=attribution_window(merchant),
            min_customers=merchant.serving.min_customers_per_arm,
            candidate=candidate,
        )
        evidence = to_flat(report.evidence)
        status.update({P.OUTCOME: REPORTED, P.REASON: report.verdict})
    except (FedshopError, KeyError, ValueError) as exc:
        reason = exc.one_line() if isinstance(exc, FedshopError) else f"bad request: {exc}"
        log.warning("merchant %s: no A/B evidence: %s", merchant.id, reason)
        status.update({P.OUTCOME: REFUSED, P.REASON: reason})
    content = RecordDict({P.STATUS: ConfigRecord(status)})  # type: ignore[arg-type]
    content[P.METRICS] = MetricRecord(evidence)  # type: ignore[arg-type]
    return content
