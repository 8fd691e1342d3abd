"""Lay out a simulation's run directory as if each merchant were its own site.

``RUN/merchants/<id>/`` holds the merchant's training events, key, ledger and
``merchant.toml``; ``RUN/keys/`` the public keys the platform trusts; ``RUN/server/`` the
evaluation archives and the platform's ledger. Merchants and the server share nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from client.merchant import MerchantConfig
from common.config import DataSource, RunConfig, dump_toml
from common.errors import ConfigError
from common.events import MERCHANT_ID, REQUIRED_COLUMNS, write_events
from common.features import build_catalog, encode_events, evaluation_records
from common.keys import generate_keypair
from common.rng import numpy_stream
from common.split import split_events
from server.checkpoint import atomic_write_bytes
from server.evaluation_set import EvaluationSet

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
    def platform_keys(self) -> Path:
        """The platform's model-signing key pair (``platform.key``, ``platform.pub``)."""
        return self.server / "platform-keys"

    def merchant_ids(self) -> list[str]:
        return list(json.loads((self.root / "merchants.json").read_text()))

    def merchant_config(self, merchant_id: str) -> MerchantConfig:
        return MerchantConfig.from_toml(self.merchants / merchant_id / "merchant.toml")


def load_events(config: RunConfig) -> pd.DataFrame:
    data = config.data
    if data.source is DataSource.COMPLETEJOURNEY:
        from common.completejourney import load_merchants

        return load_merchants(top_n=data.top_n, min_rows=data.min_rows)
    from common.synthetic import SyntheticSpec, generate_events

    spec = SyntheticSpec(
        n_merchants=data.top_n,
        events_per_merchant=data.synthetic_events_per_merchant,
        seed=config.seed,
    )
    return generate_events(spec)


def evaluation_sets(
    config: RunConfig, parts: dict[str, dict[str, pd.DataFrame]]
) -> dict[str, EvaluationSet]:
    """Fixed, seeded evaluation cases per merchant for the valid and test weeks."""
    out: dict[str, list[tuple[str, object]]] = {"valid": [], "test": []}
    for merchant, split in sorted(parts.items()):
        catalog = build_catalog(split["train"], config.model)
        contexts = {"valid": split["train"], "test": pd.concat([split["train"], split["valid"]])}
        for name in ("valid", "test"):
            if split[name].empty:
                continue
            encoded = encode_events(split[name], config.model, context=contexts[name])
            records = evaluation_records(
                encoded,
                catalog,
                candidates=config.evaluation.candidates,
                max_cases=config.evaluation.max_cases_per_merchant,
                rng=numpy_stream(config.seed, "evaluation", merchant, name),
            )
            out[name].append((merchant, records))
    return {name: EvaluationSet.concatenate(items) for name, items in out.items() if items}  # type: ignore[arg-type]


def provision(config: RunConfig, root: Path, *, events: pd.DataFrame | None = None) -> RunLayout:
    root = root.resolve()  # merchant.toml files hold absolute paths
    layout = RunLayout(root)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"run directory {root} is not empty: pick another --out or use --resume")
    frame = load_events(config) if events is None else events
    split = config.data.week_split
    parts: dict[str, dict[str, pd.DataFrame]] = {}
    for merchant, group in frame.groupby(MERCHANT_ID, sort=True):
        parts[str(merchant)] = split_events(group.reset_index(drop=True), split)
    merchants = sorted(m for m, p in parts.items() if len(p["train"]) > 0)
    if len(merchants) < config.federation.min_merchants:
        raise ConfigError(
            f"only {len(merchants)} merchants have training events "
            f"(federation.min_merchants = {config.federation.min_merchants})"
        )
    try:
        _write_layout(config, layout, {m: parts[m] for m in merchants})
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return layout


def _write_layout(
    config: RunConfig, layout: RunLayout, parts: dict[str, dict[str, pd.DataFrame]]
) -> None:
    layout.keys.mkdir(parents=True)
    # The key that signs model versions; each merchant pins a copy of its public half.
    _, platform_public = generate_keypair(layout.platform_keys, name="platform")
    for merchant, split in parts.items():
        home = layout.merchants / merchant
        (home / "state").mkdir(parents=True)
        write_events(split["train"][CANONICAL], home / "events.parquet")
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
            cohort=f"train:w{config.data.train_weeks[0]:02d}-w{config.data.train_weeks[1]:02d}",
            allow_non_private=not config.privacy.enabled,
            platform_key=home / "platform.pub",
        )
        atomic_write_bytes(home / "merchant.toml", merchant_config.to_toml().encode())
    for name, evaluation in evaluation_sets(config, parts).items():
        evaluation.save(layout.server / f"eval-{name}.npz")
    atomic_write_bytes(layout.root / "merchants.json", json.dumps(sorted(parts)).encode())
    atomic_write_bytes(layout.config, dump_toml(config.to_dict()).encode())
    log.info("provisioned %d merchants in %s", len(parts), layout.root)
