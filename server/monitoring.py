"""Health and metrics for operators: Prometheus text on ``/metrics``, JSON on ``/healthz``.

The platform's metrics (a :class:`~common.metrics_store.MetricsStore`, rendered in the
Prometheus text exposition format 0.0.4) are served by the standard library's HTTP server in a
daemon thread. The server binds to a loopback address only: put a reverse proxy with TLS in
front of it to expose it. :class:`EventLog` writes structured events as JSON lines (and to
``logging``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.metrics_store import (
    CONTENT_TYPE,
    MetricsStore,
    MetricType,
    escape_label_value,
    format_value,
)

__all__ = [
    "CONTENT_TYPE",
    "EventLog",
    "FedshopMetrics",
    "MetricType",
    "MetricsStore",
    "MonitoringServer",
    "escape_label_value",
    "format_value",
]

logger = logging.getLogger("fedshop.monitoring")


class FedshopMetrics:
    """The platform's metrics, declared once, with one method per thing that happens."""

    def __init__(self, store: MetricsStore | None = None) -> None:
        self.store = store or MetricsStore()
        s, counter, gauge = self.store, MetricType.COUNTER, MetricType.GAUGE
        s.declare("fedshop_rounds_total", counter, "Completed federated rounds.")
        s.declare("fedshop_merchants_active", gauge, "Merchants that took part in the last round.")
        s.declare(
            "fedshop_refusals_total",
            counter,
            "Rounds a merchant refused to train in, by reason.",
            ("merchant", "reason"),
        )
        s.declare(
            "fedshop_rejected_updates_total",
            counter,
            "Client updates the server rejected, by reason.",
            ("reason",),
        )
        s.declare("fedshop_promoted_version", gauge, "Model registry version that serves now.")
        s.declare(
            "fedshop_merchant_epsilon_remaining",
            gauge,
            "Privacy budget (epsilon) a merchant has left.",
            ("merchant",),
        )
        s.declare("fedshop_round_duration_seconds", gauge, "Wall time of the last round.")

    def round_finished(self, *, duration_seconds: float, merchants_active: int) -> None:
        self.store.inc("fedshop_rounds_total")
        self.store.set("fedshop_round_duration_seconds", duration_seconds)
        self.store.set("fedshop_merchants_active", merchants_active)

    def refusal(self, merchant: str, reason: str) -> None:
        self.store.inc("fedshop_refusals_total", merchant=merchant, reason=reason)

    def rejected_update(self, reason: str) -> None:
        self.store.inc("fedshop_rejected_updates_total", reason=reason)

    def promoted(self, version_id: int) -> None:
        self.store.set("fedshop_promoted_version", version_id)

    def epsilon_remaining(self, merchant: str, epsilon: float) -> None:
        self.store.set("fedshop_merchant_epsilon_remaining", epsilon, merchant=merchant)


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(f"monitoring host {host!r} is not a loopback address (use 127.0.0.1)")


class MonitoringServer:
    """``/metrics`` and ``/healthz`` on a loopback port, served from a daemon thread.

    ``port=0`` picks a free port (read it back from :attr:`port`). ``health`` returns extra
    fields for ``/healthz``; if it raises, the endpoint answers 503 with the error.
    """

    def __init__(
        self,
        store: MetricsStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        _check_loopback(host)
        if not 0 <= port <= 65535:
            raise ConfigError(f"monitoring port must be in 0..65535, got {port!r}")
        self._store = store
        self._health = health or dict
        self._started = time.monotonic()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fedshop-monitoring", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _health_body(self) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"uptime_seconds": round(time.monotonic() - self._started, 3)}
        try:
            body.update(self._health())
        except Exception as exc:  # the endpoint reports it rather than crashing the server
            return 503, {**body, "status": "error", "error": str(exc)}
        body.setdefault("status", "ok")
        return (200 if body["status"] == "ok" else 503), body

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    self._send(200, CONTENT_TYPE, outer._store.render().encode("utf-8"))
                elif self.path.split("?")[0] == "/healthz":
                    code, body = outer._health_body()
                    self._send(code, "application/json", json.dumps(body).encode("utf-8"))
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(self, code: int, content_type: str, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("monitoring: " + format, *args)

        return Handler

    def start(self) -> MonitoringServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MonitoringServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EventLog:
    """Structured events as JSON lines (one object per line, flushed), mirrored to ``logging``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def emit(self, event: str, *, now: float | None = None, **fields: Any) -> dict[str, Any]:
        if not event or not isinstance(event, str):
            raise ConfigError(f"event name must be a non-empty string, got {event!r}")
        record = {"ts": time.time() if now is None else now, "event": event, **fields}
        try:
            line = json.dumps(record, sort_keys=True, default=str, allow_nan=False)
        except ValueError as exc:
            raise ConfigError(f"event {event!r} has a field JSON cannot hold: {exc}") from None
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
        logger.info("%s %s", event, json.dumps(fields, sort_keys=True, default=str))
        return record
