"""A merchant's own configuration: identity, data, ledger, key and privacy caps.

It lives on the merchant's machine (``merchant.toml``). The platform may request a smaller
epsilon than the cap here, never a larger one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from client.inbox import ArrivalMode
from client.serving.config import ServingConfig
from common.accounting import MAX_EPSILON_CAP, MIN_NOISE_MULTIPLIER, PrivacyUnit
from common.configparse import from_mapping, load_toml
from common.errors import ConfigError
from common.keys import NAME_PATTERN


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
    # per stream cohort (event level; composes per customer), never above epsilon_cap:
    stream_epsilon_cap: float = 1.0
    # Held-out events the merchant scores models on (federated evaluation, client/evaluation.py):
    validation_data: Path | None = None  # weeks after `data` (per-round validation)
    test_data: Path | None = None  # weeks after `validation_data` (final test)
    holdout_share: float = 0.0  # online: share of customers kept out of fine-tuning for the gate
    evaluation_noise: float = 0.0  # std of Gaussian noise on every evaluation sum sent (0: none)
    platform_key: Path | None = None  # pinned Ed25519 key that signs the models it may serve
    serving: ServingConfig = field(default_factory=ServingConfig)  # [merchant.serving]
    # App bundles this merchant answers besides its installed release (docs/deployment.md);
    # read by `fedshop client`'s runner, which always runs the installed code.
    app_hashes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.id):  # the ledger's rule, checked at load time
            raise ConfigError(
                f"merchant.id {self.id!r} is not a valid merchant name: use 1-128 letters, "
                "digits, '.', '_' or '-', starting with a letter or digit"
            )
        for name in ("epsilon_cap", "stream_epsilon_cap"):
            if not 0 < getattr(self, name) <= MAX_EPSILON_CAP:
                raise ConfigError(
                    f"merchant.{name} must be in (0, {MAX_EPSILON_CAP:g}], got "
                    f"{getattr(self, name)}"
                )
        if not (0 < self.delta < 1):
            raise ConfigError(f"merchant.delta must be in (0, 1), got {self.delta}")
        if not self.max_noise_multiplier >= MIN_NOISE_MULTIPLIER:
            raise ConfigError(
                f"merchant.max_noise_multiplier must be >= {MIN_NOISE_MULTIPLIER:g}, got "
                f"{self.max_noise_multiplier}"
            )
        if self.threads < 1:
            raise ConfigError(f"merchant.threads must be >= 1, got {self.threads}")
        for value in self.app_hashes:
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ConfigError(
                    f"merchant.app_hashes entry {value!r} is not an app hash (64 lowercase hex "
                    "digits, as `fedshop client --print-app-hash` prints)"
                )
        if not 0 <= self.holdout_share < 1:
            raise ConfigError(f"merchant.holdout_share must be in [0, 1), got {self.holdout_share}")
        if not (math.isfinite(self.evaluation_noise) and self.evaluation_noise >= 0):
            raise ConfigError(
                f"merchant.evaluation_noise must be >= 0, got {self.evaluation_noise}"
            )

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @property
    def outbox(self) -> Path:
        return self.state_dir / "outbox"

    @property
    def models_dir(self) -> Path:
        """The merchant's mirror of the platform's registry (client/model_mirror.py)."""
        return self.state_dir / "models"

    @property
    def serving_dir(self) -> Path:
        """Impressions, purchases, attributions and the A/B key: never leave the merchant."""
        return self.state_dir / "serving"

    @classmethod
    def from_toml(cls, path: Path) -> MerchantConfig:
        data = load_toml(path)
        unknown = set(data) - {"merchant"}
        if unknown or "merchant" not in data:
            raise ConfigError(
                f"{path}: expected exactly one [merchant] table, found {sorted(data)}"
            )
        table = _resolve_paths(dict(data["merchant"]), path.parent, _PATH_KEYS)
        if isinstance(table.get("serving"), dict):
            table["serving"] = _resolve_paths(dict(table["serving"]), path.parent, _TLS_KEYS)
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
            "holdout_share": self.holdout_share,
            "evaluation_noise": self.evaluation_noise,
        }
        for name in ("inbox", "validation_data", "test_data", "platform_key"):
            if getattr(self, name) is not None:
                values[name] = str(getattr(self, name))
        if self.app_hashes:
            values["app_hashes"] = list(self.app_hashes)
        serving = {
            name: str(value) if isinstance(value, Path) else value
            for name, value in self.serving.__dict__.items()
            if value != getattr(ServingConfig(), name)
        }
        if serving:
            values["serving"] = serving
        return tomli_w.dumps({"merchant": values})


_PATH_KEYS = (
    "data",
    "state_dir",
    "signing_key",
    "inbox",
    "validation_data",
    "test_data",
    "platform_key",
)
_TLS_KEYS = ("tls_cert", "tls_key")


def _resolve_paths(table: dict, base: Path, keys: tuple[str, ...]) -> dict:
    """Relative paths in ``table`` are relative to the TOML file's directory."""
    for key in keys:
        if isinstance(table.get(key), str) and not Path(table[key]).is_absolute():
            table[key] = str((base / table[key]).resolve())
    return table
