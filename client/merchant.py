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
    # App bundles this merchant answers besides its installed release (docs/deployment.md);
    # read by `fedshop client`'s runner, which always runs the installed code.
    app_hashes: tuple[str, ...] = ()

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
        for value in self.app_hashes:
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ConfigError(
                    f"merchant.app_hashes entry {value!r} is not an app hash (64 lowercase hex "
                    "digits, as `fedshop client --print-app-hash` prints)"
                )

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
        """The ``[merchant]`` table that :meth:`from_toml` reads back to an equal config."""
        values: dict[str, object] = {
            "id": self.id,
            "data": str(self.data),
            "state_dir": str(self.state_dir),
            "signing_key": str(self.signing_key),
            "epsilon_cap": self.epsilon_cap,
            "delta": self.delta,
            "privacy_unit": self.privacy_unit.value,
            "cohort": self.cohort,
            "device": self.device,
            "threads": self.threads,
            "allow_non_private": self.allow_non_private,
            "max_noise_multiplier": self.max_noise_multiplier,
            "inbox_arrival": self.inbox_arrival.value,
            "stream_epsilon_cap": self.stream_epsilon_cap,
        }
        if self.inbox is not None:
            values["inbox"] = str(self.inbox)
        if self.app_hashes:
            values["app_hashes"] = list(self.app_hashes)
        lines = ["[merchant]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    return repr(value)


def _toml_char(char: str) -> str:
    # TOML basic strings forbid quote, backslash and control characters other than tab.
    if char in '"\\':
        return "\\" + char
    if (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F:
        return f"\\u{ord(char):04X}"
    return char
