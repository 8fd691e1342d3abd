"""``[merchant.serving]`` in merchant.toml: how the merchant serves recommendations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError


@dataclass(frozen=True)
class ServingConfig:
    """Service address, TLS, A/B share and attribution window (docs/serving.md)."""

    host: str = "127.0.0.1"
    port: int = 8470
    tls_cert: Path | None = None  # the merchant's certificate (PEM); TLS when both are set
    tls_key: Path | None = None
    default_k: int = 10
    max_k: int = 100
    ab_share: float = 0.0  # share of customers who get a published candidate (0 = no A/B test)
    attribution_window_hours: float = 168.0  # a purchase this long after a response joins it
    retention_days: float = 60.0  # responses older than this are forgotten (>= the window)
    reload_interval_s: float = 1.0  # how often the service looks for a new publication
    min_customers_per_arm: int = 100  # below this an A/B report says the sample is too small
    max_purchase_rows: int = 10_000  # per POST /purchases request

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"merchant.serving.port must be in 0..65535, got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("merchant.serving.tls_cert and tls_key must be set together")
        if not 1 <= self.default_k <= self.max_k:
            raise ConfigError(
                f"merchant.serving needs 1 <= default_k <= max_k, got {self.default_k} and "
                f"{self.max_k}"
            )
        if not (math.isfinite(self.ab_share) and 0.0 <= self.ab_share <= 1.0):
            raise ConfigError(f"merchant.serving.ab_share must be in [0, 1], got {self.ab_share}")
        if not self.retention_days * 24 >= self.attribution_window_hours:
            raise ConfigError(
                f"merchant.serving.retention_days ({self.retention_days}) must cover the "
                f"attribution window ({self.attribution_window_hours} h)"
            )
        for name in ("attribution_window_hours", "reload_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"merchant.serving.{name} must be > 0, got {value!r}")
        for name in ("min_customers_per_arm", "max_purchase_rows"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"merchant.serving.{name} must be >= 1, got {value}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
