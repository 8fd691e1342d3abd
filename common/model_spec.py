"""The model's shape, kept free of torch so configuration parsing stays light."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the model; must be identical on every merchant and the server."""

    product_buckets: int = 1 << 15
    category_buckets: int = 1 << 10
    department_buckets: int = 64
    embedding_dim: int = 32
    hidden_dim: int = 64
    history_length: int = 30

    def __post_init__(self) -> None:
        for name in ("product_buckets", "category_buckets", "department_buckets"):
            if getattr(self, name) < 2:
                raise ConfigError(f"model.{name} must be >= 2, got {getattr(self, name)}")
        for name in ("embedding_dim", "hidden_dim", "history_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
