"""The recommendation service's Prometheus metrics, declared once, one method per event.

Labels are bounded sets (endpoint templates, status codes, arms, error kinds), never customer or
product ids: ``/metrics`` may be scraped by the merchant's own monitoring and says nothing about
any customer.
"""

from __future__ import annotations

from common.metrics_store import MetricsStore, MetricType

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServingMetrics:
    def __init__(self, store: MetricsStore | None = None) -> None:
        self.store = store or MetricsStore()
        s, counter, gauge = self.store, MetricType.COUNTER, MetricType.GAUGE
        s.declare(
            "fedshop_serving_requests_total",
            counter,
            "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status"),
        )
        s.declare(
            "fedshop_serving_request_seconds",
            MetricType.HISTOGRAM,
            "Time from request to response, by endpoint.",
            ("endpoint",),
            buckets=LATENCY_BUCKETS,
        )
        s.declare(
            "fedshop_serving_errors_total",
            counter,
            "Requests answered with an error, by endpoint and kind.",
            ("endpoint", "kind"),
        )
        s.declare(
            "fedshop_serving_arm_responses_total",
            counter,
            "Recommendations served, by A/B arm.",
            ("arm",),
        )
        s.declare(
            "fedshop_serving_cold_start_total", counter, "Recommendations for customers new here."
        )
        s.declare(
            "fedshop_serving_version",
            gauge,
            "Model version each arm serves (0: the arm is off).",
            ("arm",),
        )
        s.declare("fedshop_serving_publication_serial", gauge, "Serial of the publication served.")
        s.declare("fedshop_serving_swaps_total", counter, "Hot swaps to a new publication.")
        s.declare(
            "fedshop_serving_refused_total",
            counter,
            "Publications or versions refused at load (signature, hash or shape).",
        )
        s.declare(
            "fedshop_serving_impressions_dropped_total",
            counter,
            "Responses not recorded because the impression queue was full.",
        )
        s.declare(
            "fedshop_serving_purchases_total",
            counter,
            "Purchases reported, by what they joined (shown, not_shown, none, repeat).",
            ("joined",),
        )

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.store.inc("fedshop_serving_requests_total", endpoint=endpoint, status=str(status))
        self.store.observe("fedshop_serving_request_seconds", seconds, endpoint=endpoint)

    def error(self, endpoint: str, kind: str) -> None:
        self.store.inc("fedshop_serving_errors_total", endpoint=endpoint, kind=kind)

    def served(self, arm: str, *, known: bool) -> None:
        self.store.inc("fedshop_serving_arm_responses_total", arm=arm)
        if not known:
            self.store.inc("fedshop_serving_cold_start_total")

    def swapped(self, serial: int, versions: dict[str, int]) -> None:
        self.store.inc("fedshop_serving_swaps_total")
        self.store.set("fedshop_serving_publication_serial", serial)
        for arm, version in versions.items():
            self.store.set("fedshop_serving_version", version, arm=arm)

    def refused(self) -> None:
        self.store.inc("fedshop_serving_refused_total")

    def impression_dropped(self) -> None:
        self.store.inc("fedshop_serving_impressions_dropped_total")

    def purchases(self, *, shown: int, not_shown: int, none: int, repeat: int) -> None:
        for joined, count in (
            ("shown", shown),
            ("not_shown", not_shown),
            ("none", none),
            ("repeat", repeat),
        ):
            self.store.inc("fedshop_serving_purchases_total", count, joined=joined)
