"""Monitoring: Prometheus text scraped over loopback, health JSON, structured event log."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError
from server.monitoring import (
    CONTENT_TYPE,
    EventLog,
    FedshopMetrics,
    MetricsStore,
    MetricType,
    MonitoringServer,
)

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
UNESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _unescape(match: re.Match[str]) -> str:
    return "\n" if match.group(1) == "n" else match.group(1)


LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A strict little parser of the text format: every non-comment line must be a sample."""
    samples = {}
    assert text.endswith("\n")
    for line in text[:-1].split("\n"):  # the format's only line separator is \n
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \S+ ", line), line
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = LABEL.findall(labels or "")
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or "")
        unescaped = tuple((k, UNESCAPE.sub(_unescape, v)) for k, v in pairs)
        samples[(name, unescaped)] = float(value)
    return samples


def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_scrape_metrics_over_loopback() -> None:
    metrics = FedshopMetrics()
    metrics.round_finished(duration_seconds=12.5, merchants_active=3)
    metrics.round_finished(duration_seconds=10.0, merchants_active=4)
    metrics.refusal("store-367", "budget")
    metrics.refusal('we"ird\\shop\nname', "budget")
    metrics.rejected_update("norm")
    metrics.promoted(7)
    metrics.epsilon_remaining("store-367", 1.75)
    with MonitoringServer(metrics.store) as server:
        status, content_type, body = fetch(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200 and content_type == CONTENT_TYPE
    samples = parse(body)
    assert samples[("fedshop_rounds_total", ())] == 2
    assert samples[("fedshop_round_duration_seconds", ())] == 10.0
    assert samples[("fedshop_merchants_active", ())] == 4
    assert (
        samples[("fedshop_refusals_total", (("merchant", "store-367"), ("reason", "budget")))] == 1
    )
    weird = ("fedshop_refusals_total", (("merchant", 'we"ird\\shop\nname'), ("reason", "budget")))
    assert samples[weird] == 1
    assert samples[("fedshop_rejected_updates_total", (("reason", "norm"),))] == 1
    assert samples[("fedshop_promoted_version", ())] == 7
    assert samples[("fedshop_merchant_epsilon_remaining", (("merchant", "store-367"),))] == 1.75
    assert "# TYPE fedshop_rounds_total counter" in body
    assert "# TYPE fedshop_promoted_version gauge" in body


def test_healthz_and_unknown_path() -> None:
    state = {"status": "ok", "round": 3}
    with MonitoringServer(MetricsStore(), health=lambda: state) as server:
        base = f"http://127.0.0.1:{server.port}"
        status, content_type, body = fetch(f"{base}/healthz")
        assert status == 200 and content_type == "application/json"
        payload = json.loads(body)
        assert (
            payload["round"] == 3 and payload["status"] == "ok" and payload["uptime_seconds"] >= 0
        )
        state["status"] = "degraded"
        assert fetch(f"{base}/healthz")[0] == 503
        assert fetch(f"{base}/nope")[0] == 404


def test_health_callback_error_is_reported() -> None:
    def broken() -> dict[str, str]:
        raise RuntimeError("ledger unreadable")

    with MonitoringServer(MetricsStore(), health=broken) as server:
        status, _, body = fetch(f"http://127.0.0.1:{server.port}/healthz")
    assert status == 503 and json.loads(body)["error"] == "ledger unreadable"


def test_refuses_non_loopback_and_bad_declarations() -> None:
    with pytest.raises(ConfigError, match=r"0\.0\.0\.0"):
        MonitoringServer(MetricsStore(), host="0.0.0.0")
    store = MetricsStore()
    with pytest.raises(ConfigError, match="bad-name"):
        store.declare("bad-name", MetricType.GAUGE, "x")
    store.declare("c_total", MetricType.COUNTER, "c", ("merchant",))
    with pytest.raises(ConfigError, match="labels"):
        store.inc("c_total", reason="x")
    with pytest.raises(ConfigError, match="-1"):
        store.inc("c_total", -1, merchant="m")
    with pytest.raises(ConfigError, match="not a gauge"):
        store.set("c_total", 1, merchant="m")


def test_counters_are_thread_safe() -> None:
    store = MetricsStore()
    store.declare("hits_total", MetricType.COUNTER, "hits", ("merchant",))

    def work() -> None:
        for _ in range(2000):
            store.inc("hits_total", merchant="m")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.value("hits_total", merchant="m") == 8000


def test_special_values_render() -> None:
    store = MetricsStore()
    store.declare("g", MetricType.GAUGE, "multi\nline \\ help")
    store.set("g", float("inf"))
    text = store.render()
    assert "g +Inf" in text and "# HELP g multi\\nline \\\\ help" in text


def test_event_log_writes_json_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = EventLog(tmp_path / "logs" / "events.jsonl")
    with caplog.at_level("INFO", logger="fedshop.monitoring"):
        log.emit("round_finished", now=1.5, round=3, merchants=["a", "b"])
        log.emit("promoted", now=2.0, version=4, path=tmp_path)
    lines = (tmp_path / "logs" / "events.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0] == {"ts": 1.5, "event": "round_finished", "round": 3, "merchants": ["a", "b"]}
    assert records[1]["path"] == str(tmp_path)
    assert "round_finished" in caplog.text
    with pytest.raises(ConfigError, match="'bad'"):
        log.emit("bad", value=float("nan"))
    assert len((tmp_path / "logs" / "events.jsonl").read_text().splitlines()) == 2


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_label_value_round_trips(value: str) -> None:
    store = MetricsStore()
    store.declare("x_total", MetricType.COUNTER, "x", ("merchant",))
    store.inc("x_total", 2, merchant=value)
    store.inc("x_total", 1, merchant="\\n")  # a backslash then n: not a newline
    expected = {("x_total", (("merchant", "\\n"),)): 1.0}
    expected[("x_total", (("merchant", value),))] = (
        expected.get(("x_total", (("merchant", value),)), 0) + 2.0
    )
    assert parse(store.render()) == expected
