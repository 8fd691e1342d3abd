"""A merchant's own configuration: identity, data, ledger, key and privacy caps.

It lives on the merchant's machine (``merchant.toml``). The platform may request a smaller
epsilon than the cap here, never a larger one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from client.inbox import ArrivalMode
from common.accounting import PrivacyUnit
from common.configparse import from_mapping, load_toml
from common.errors import ConfigError


@dataclass(frozen=True)
class MerchantConfig:
    id: str
    data: Path  # canonical events (Parquet) this merchant trains on
    state_dir: Path  # ledger.sqlite, outbox/ and caches
    signing_key: Path  # Ed25519 private key that signs ledger entries
    epsilon_cap: float = 8.0
    delta: float = 1e-5  # upper bound; the merchant uses min(delta, 1/(10 x records))
    privacy_unit: PrivacyUnit = PrivacyUnit.EVENT
    cohort: str = "history"
    device: str = "auto"  # "auto" takes a CUDA device when one is present
    threads: int = 1
    allow_non_private: bool = False  # only for a data scientist's own baselines in simulation
    max_noise_multiplier: float = 10.0  # refuse rounds whose remaining budget needs more noise
    inbox: Path | None = None  # online fine-tuning: the inbox root (see docs/online.md)
    inbox_arrival: ArrivalMode = ArrivalMode.STABLE  # how the inbox knows a file is complete
    stream_epsilon_cap: float = 1.0  # per stream cohort (event level); composes per customer

    def __post_init__(self) -> None:
        if not self.id or any(c in self.id for c in "/\\\0"):
            raise ConfigError(
                f"merchant.id must be a non-empty name without slashes, got {self.id!r}"
            )
        if not (self.epsilon_cap > 0 and math.isfinite(self.epsilon_cap)):
            raise ConfigError(f"merchant.epsilon_cap must be > 0, got {self.epsilon_cap}")
        if not (0 < self.delta < 1):
            raise ConfigError(f"merchant.delta must be in (0, 1), got {self.delta}")
        if not self.max_noise_multiplier > 0:
            raise ConfigError(
                f"merchant.max_noise_multiplier must be > 0, got {self.max_noise_multiplier}"
            )
        if self.threads < 1:
            raise ConfigError(f"merchant.threads must be >= 1, got {self.threads}")

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @property
    def outbox(self) -> Path:
        return self.state_dir / "outbox"

    @classmethod
    def from_toml(cls, path: Path) -> MerchantConfig:
        data = load_toml(path)
        unknown = set(data) - {"merchant"}
        if unknown or "merchant" not in data:
            raise ConfigError(
                f"{path}: expected exactly one [merchant] table, found {sorted(data)}"
            )
        table = dict(data["merchant"])
        for key in ("data", "state_dir", "signing_key", "state-dir", "signing-key"):
            if key in table and not Path(table[key]).is_absolute():
                table[key] = str((path.parent / table[key]).resolve())
        try:
            return from_mapping(cls, table, prefix="merchant")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_toml(self) -> str:
        return (
            "[merchant]\n"
            f'id = "{self.id}"\n'
            f'data = "{self.data}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'signing_key = "{self.signing_key}"\n'
            f"epsilon_cap = {self.epsilon_cap!r}\n"
            f"delta = {self.delta!r}\n"
            f'privacy_unit = "{self.privacy_unit.value}"\n'
            f'cohort = "{self.cohort}"\n'
            f'device = "{self.device}"\n'
            f"threads = {self.threads}\n"
            f"allow_non_private = {'true' if self.allow_non_private else 'false'}\n"
            f"max_noise_multiplier = {self.max_noise_multiplier!r}\n"
            f"inbox_arrival = \"{self.inbox_arrival.value}\"\n"
            f"stream_epsilon_cap = {self.stream_epsilon_cap!r}\n"
            + (f'inbox = "{self.inbox}"\n' if self.inbox is not None else "")
        )
