"""Lay out a simulation's run directory as if each merchant were its own site.

``RUN/merchants/<id>/`` holds the merchant's training events, its held-out validation and test
events (``holdout/``, which it evaluates models on itself), keys, DP secret, ledger and
``merchant.toml``; ``RUN/keys/`` the public keys the platform trusts; ``RUN/server/`` the
platform's ledger (and, online, its registry). Merchants and the server share nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from client.dp_randomness import ensure_merchant_secret
from client.merchant import MerchantConfig
from common.atomic import atomic_write_bytes
from common.config import RunConfig, dump_toml
from common.datasets import Dataset, load_dataset
from common.errors import ConfigError
from common.events import REQUIRED_COLUMNS, write_events
from common.keys import generate_keypair
from common.split import TimeSplit

log = logging.getLogger(__name__)

CANONICAL = list(REQUIRED_COLUMNS)


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def merchants(self) -> Path:
        return self.root / "merchants"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def server(self) -> Path:
        return self.root / "server"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    def time_split(self) -> TimeSplit:
        """The train / valid / test periods and the slice calendar chosen at provisioning."""
        return TimeSplit.from_dict(json.loads(self.split.read_text()))

    @property
    def platform_keys(self) -> Path:
        """The platform's model-signing key pair (``platform.key``, ``platform.pub``)."""
        return self.server / "platform-keys"

    def merchant_ids(self) -> list[str]:
        return list(json.loads((self.root / "merchants.json").read_text()))

    def merchant_config(self, merchant_id: str) -> MerchantConfig:
        return MerchantConfig.from_toml(self.merchants / merchant_id / "merchant.toml")


def load_events(config: RunConfig) -> pd.DataFrame:
    """The selected merchants' canonical events of ``config.data`` (any source)."""
    return load_dataset(config).events


def provision(
    config: RunConfig,
    root: Path,
    *,
    events: pd.DataFrame | None = None,
    dataset: Dataset | None = None,
) -> RunLayout:
    """Lay out ``root`` for ``config``'s merchants; ``dataset`` (already loaded and checked)
    or ``events`` replace loading the configured source. Nothing is left behind on error."""
    root = root.resolve()  # merchant.toml files hold absolute paths
    layout = RunLayout(root)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"run directory {root} is not empty: pick another --out or use --resume")
    if dataset is None:
        dataset = load_dataset(config, events=events)
    parts = dataset.parts()
    merchants = sorted(parts)
    if len(merchants) < config.federation.min_merchants:
        raise ConfigError(
            f"only {len(merchants)} merchants take part "
            f"(federation.min_merchants = {config.federation.min_merchants})"
        )
    try:
        _write_layout(config, layout, parts, dataset.split)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return layout


def _write_layout(
    config: RunConfig,
    layout: RunLayout,
    parts: dict[str, dict[str, pd.DataFrame]],
    time_split: TimeSplit,
) -> None:
    layout.keys.mkdir(parents=True)
    # The key that signs model versions; each merchant pins a copy of its public half.
    _, platform_public = generate_keypair(layout.platform_keys, name="platform")
    for merchant, split in parts.items():
        home = layout.merchants / merchant
        (home / "state").mkdir(parents=True)
        ensure_merchant_secret(home / "state")
        write_events(split["train"][CANONICAL], home / "events.parquet")
        held = {}
        for part in ("valid", "test"):
            if len(split[part]):
                held[part] = home / "holdout" / f"{part}.parquet"
                held[part].parent.mkdir(exist_ok=True)
                write_events(split[part][CANONICAL], held[part])
        private, public = generate_keypair(home, name=merchant)
        shutil.copy(public, layout.keys / f"{merchant}.pub")
        shutil.copy(platform_public, home / "platform.pub")
        merchant_config = MerchantConfig(
            id=merchant,
            data=home / "events.parquet",
            state_dir=home / "state",
            signing_key=private,
            epsilon_cap=config.privacy.epsilon_cap,
            delta=config.privacy.delta,
            privacy_unit=config.privacy.unit,
            cohort=time_split.cohort(),
            allow_non_private=not config.privacy.enabled,
            validation_data=held.get("valid"),
            test_data=held.get("test"),
            platform_key=home / "platform.pub",
        )
        atomic_write_bytes(home / "merchant.toml", merchant_config.to_toml().encode())
    layout.server.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(layout.root / "merchants.json", json.dumps(sorted(parts)).encode())
    # The run id names every release of this run directory (and the merchants' DP streams):
    # fixed at creation, so a copy of the directory replays the same run.
    atomic_write_bytes(layout.root / "run-id", uuid.uuid4().hex[:12].encode())
    atomic_write_bytes(layout.split, json.dumps(time_split.to_dict(), indent=1).encode())
    atomic_write_bytes(layout.config, dump_toml(config.to_dict()).encode())
    log.info("provisioned %d merchants in %s", len(parts), layout.root)
