"""Counters, gauges and histograms with labels, rendered in the Prometheus text format 0.0.4.

Shared by the platform's monitoring endpoint (server/monitoring.py) and the merchant's
recommendation service (client/serving); every method is safe to call from several threads.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from common.errors import ConfigError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[tuple[str, str], ...]


class MetricType(Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass
class _Histogram:
    """Cumulative bucket counts (one per upper bound, then +Inf), sum and count."""

    counts: list[int]
    total: float = 0.0
    count: int = 0


@dataclass
class _Family:
    kind: MetricType
    help: str
    labels: tuple[str, ...]
    values: dict[LabelKey, float] = field(default_factory=dict)
    buckets: tuple[float, ...] = ()
    histograms: dict[LabelKey, _Histogram] = field(default_factory=dict)


def escape_label_value(value: str) -> str:
    """Escape ``\\``, ``"`` and newlines as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _check_buckets(name: str, buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    increasing = list(bounds) == sorted(set(bounds))
    if not bounds or not increasing or any(not math.isfinite(b) for b in bounds):
        raise ConfigError(
            f"histogram {name!r} needs finite, strictly increasing buckets, got {buckets!r}"
        )
    return bounds


class MetricsStore:
    """Counters, gauges and histograms, keyed by label values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def declare(
        self,
        name: str,
        kind: MetricType,
        help: str,
        labels: tuple[str, ...] = (),
        *,
        buckets: Sequence[float] = (),
    ) -> None:
        """Declare a metric once; re-declaring with the same shape is allowed.

        ``buckets`` (upper bounds, increasing) are required for a histogram and refused
        otherwise; ``+Inf`` is always added."""
        if not _METRIC_NAME.match(name):
            raise ConfigError(f"metric name {name!r} is not valid")
        for label in labels:
            if not _LABEL_NAME.match(label) or label.startswith("__") or label == "le":
                raise ConfigError(f"label name {label!r} of metric {name!r} is not valid")
        if (kind is MetricType.HISTOGRAM) != bool(buckets):
            raise ConfigError(f"metric {name!r}: buckets go with histograms, and only with them")
        bounds = _check_buckets(name, buckets) if buckets else ()
        with self._lock:
            existing = self._families.get(name)
            if existing is not None:
                if (existing.kind, existing.labels, existing.buckets) != (kind, labels, bounds):
                    raise ConfigError(f"metric {name!r} already declared differently")
                return
            self._families[name] = _Family(kind, help, labels, buckets=bounds)

    def _key(self, family: _Family, name: str, labels: Mapping[str, str]) -> LabelKey:
        if set(labels) != set(family.labels):
            raise ConfigError(
                f"metric {name!r} takes labels {sorted(family.labels)}, got {sorted(labels)}"
            )
        return tuple((k, str(labels[k])) for k in family.labels)

    def _family(self, name: str, kind: MetricType) -> _Family:
        family = self._families.get(name)
        if family is None:
            raise ConfigError(f"metric {name!r} was not declared")
        if family.kind is not kind:
            raise ConfigError(f"metric {name!r} is a {family.kind.value}, not a {kind.value}")
        return family

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` (>= 0) to a counter."""
        if not (math.isfinite(amount) and amount >= 0):
            raise ConfigError(f"counter {name!r} can only grow; got amount {amount!r}")
        with self._lock:
            family = self._family(name, MetricType.COUNTER)
            key = self._key(family, name, labels)
            family.values[key] = family.values.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        with self._lock:
            family = self._family(name, MetricType.GAUGE)
            family.values[self._key(family, name, labels)] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record one observation in a histogram."""
        if not math.isfinite(value):
            raise ConfigError(f"histogram {name!r} observation must be finite, got {value!r}")
        with self._lock:
            family = self._family(name, MetricType.HISTOGRAM)
            key = self._key(family, name, labels)
            histogram = family.histograms.get(key)
            if histogram is None:
                histogram = family.histograms[key] = _Histogram([0] * (len(family.buckets) + 1))
            histogram.counts[bisect.bisect_left(family.buckets, value)] += 1
            histogram.total += value
            histogram.count += 1

    def value(self, name: str, **labels: str) -> float | None:
        """A counter's or gauge's value (a histogram's observation count)."""
        with self._lock:
            family = self._families.get(name)
            if family is None:
                raise ConfigError(f"metric {name!r} was not declared")
            key = self._key(family, name, labels)
            if family.kind is MetricType.HISTOGRAM:
                histogram = family.histograms.get(key)
                return None if histogram is None else float(histogram.count)
            return family.values.get(key)

    def render(self) -> str:
        """The whole store in the Prometheus text format 0.0.4."""
        lines: list[str] = []
        with self._lock:
            for name in sorted(self._families):
                family = self._families[name]
                lines.append(f"# HELP {name} {_escape_help(family.help)}")
                lines.append(f"# TYPE {name} {family.kind.value}")
                if family.kind is MetricType.HISTOGRAM:
                    for key in sorted(family.histograms):
                        lines += _histogram_lines(name, key, family)
                    continue
                for key in sorted(family.values):
                    lines.append(f"{name}{_labels(key)} {format_value(family.values[key])}")
        return "\n".join(lines) + "\n"


def _labels(key: LabelKey) -> str:
    text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in key)
    return f"{{{text}}}" if text else ""


def _histogram_lines(name: str, key: LabelKey, family: _Family) -> list[str]:
    histogram = family.histograms[key]
    lines = []
    cumulative = 0
    for bound, count in zip((*family.buckets, math.inf), histogram.counts, strict=True):
        cumulative += count
        le = (("le", format_value(bound)),)
        lines.append(f"{name}_bucket{_labels(key + le)} {cumulative}")
    lines.append(f"{name}_sum{_labels(key)} {format_value(histogram.total)}")
    lines.append(f"{name}_count{_labels(key)} {histogram.count}")
    return lines
