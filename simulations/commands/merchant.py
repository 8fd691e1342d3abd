"""``fedshop merchant init``: everything one merchant needs, in one folder, in one step.

The folder holds the merchant's imported events (split in time into training events and
held-out validation and test events, which the merchant scores models on in federated
evaluation), its ``merchant.toml``, its SuperNode key (``NAME.node.key``), its ledger signing
key (``NAME.key``) and its state directory with the secret that seeds its DP randomness. It
is built in a temporary folder next to the destination and renamed into place at the end, so
a failure (a bad row in the events, a full disk) leaves nothing behind. The command ends by
listing the public parts the platform's operator must collect.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from client.dp_randomness import SECRET_FILE, ensure_merchant_secret
from client.merchant import MerchantConfig
from common import certs, keys
from common.accounting import PrivacyUnit
from common.atomic import atomic_write_bytes
from common.errors import ConfigError, DataValidationError
from common.events import (
    MERCHANT_ID,
    TIMESTAMP,
    parse_mapping,
    read_events,
    summarize,
    write_events,
)
from common.split import TimeSplit, parse_moment, split_by_dates, split_by_span
from simulations.cli import check_output_directory

EVENTS_FILE = "events.parquet"
HOLDOUT_DIR = "holdout"
CONFIG_FILE = "merchant.toml"
KEYS_DIR = "keys"
STATE_DIR = "state"
PLATFORM_KEY = "platform.pub"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "merchant",
        help="set up a merchant's folder for a deployment",
        description="Set up what one merchant needs to join a deployment (docs/deployment.md).",
    )
    actions = parser.add_subparsers(dest="merchant_command", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init",
        help="create a merchant folder: events, merchant.toml, node key, ledger key, state",
        description=__doc__,
    )
    init.add_argument("--id", required=True, help="the merchant id (letters, digits, . _ -)")
    init.add_argument(
        "--events", type=Path, required=True, help="the merchant's event export (.csv/.parquet)"
    )
    init.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="SRC=FIELD",
        help="rename a column of the export to a schema field (see docs/data.md)",
    )
    init.add_argument("--out", type=Path, required=True, help="the folder to create")
    init.add_argument(
        "--epsilon-cap",
        type=float,
        default=MerchantConfig.epsilon_cap,
        help="this merchant's own privacy budget; the platform can never ask for more "
        f"(default {MerchantConfig.epsilon_cap:g})",
    )
    init.add_argument(
        "--valid-fraction",
        type=float,
        default=0.1,
        help="share of the events' time span held out for validation, before the test share "
        "(default 0.1)",
    )
    init.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="share of the events' time span held out for the final test (default 0.1)",
    )
    init.add_argument(
        "--train-until",
        help="instead of fractions: training events are before this date/time (ISO, naive = "
        "UTC); the federation should agree on it",
    )
    init.add_argument("--valid-until", help="with --train-until: validation events are before it")
    init.add_argument(
        "--platform-key",
        type=Path,
        help="the platform's model-signing public key (platform.pub), for serving models it "
        "publishes (docs/serving.md)",
    )
    init.add_argument(
        "--privacy-unit",
        choices=[unit.value for unit in PrivacyUnit],
        default=MerchantConfig.privacy_unit.value,
        help="what one privacy release protects (docs/privacy.md)",
    )
    init.set_defaults(handler=run_init)


@dataclass(frozen=True)
class MerchantFolder:
    """The layout ``fedshop merchant init`` creates under ``root``."""

    root: Path
    merchant_id: str

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def events(self) -> Path:
        return self.root / EVENTS_FILE

    @property
    def keys(self) -> Path:
        return self.root / KEYS_DIR

    def holdout(self, part: str) -> Path:
        return self.root / HOLDOUT_DIR / f"{part}.parquet"

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def node_public_key(self) -> Path:
        return self.keys / f"{self.merchant_id}{certs.NODE_PUB_SUFFIX}"

    @property
    def node_private_key(self) -> Path:
        return self.keys / f"{self.merchant_id}{certs.NODE_KEY_SUFFIX}"

    @property
    def ledger_public_key(self) -> Path:
        return self.keys / f"{self.merchant_id}{keys.PUBLIC_SUFFIX}"

    @property
    def ledger_private_key(self) -> Path:
        return self.keys / f"{self.merchant_id}{keys.PRIVATE_SUFFIX}"


def read_own_events(path: Path, merchant_id: str, mapping: dict[str, str]) -> pd.DataFrame:
    """The export as canonical events of this merchant only.

    An export without a ``merchant_id`` column gets this merchant's id; one with the column
    must name only this merchant (another merchant's rows never enter its folder).
    """
    try:
        return read_events(path, mapping=mapping, merchant_id=merchant_id)
    except DataValidationError as exc:
        if exc.column != MERCHANT_ID:
            raise
    frame = read_events(path, mapping=mapping)
    others = sorted({str(v) for v in frame[MERCHANT_ID].unique()} - {merchant_id})
    if others:
        raise DataValidationError(
            f"rows of other merchants ({', '.join(others[:5])}); a merchant imports only its "
            f"own events (merchant id {merchant_id!r})",
            file=str(path),
            column=MERCHANT_ID,
        )
    return frame


def time_split(events: pd.DataFrame, args: argparse.Namespace) -> TimeSplit:
    """Dates given (``--train-until``/``--valid-until``) or fractions of the events' span."""
    first, last = events[TIMESTAMP].min(), events[TIMESTAMP].max()
    if args.train_until or args.valid_until:
        if not (args.train_until and args.valid_until):
            raise ConfigError("--train-until and --valid-until go together")
        return split_by_dates(
            train_until=parse_moment(args.train_until, field="--train-until"),
            valid_until=parse_moment(args.valid_until, field="--valid-until"),
            first_event=first,
        )
    for flag, value in (
        ("--valid-fraction", args.valid_fraction),
        ("--test-fraction", args.test_fraction),
    ):
        if not 0 < value < 0.5:
            raise ConfigError(f"{flag} must be between 0 and 0.5, got {value}")
    return split_by_span(
        first_event=first,
        last_event=last,
        valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction,
    )


def create_merchant_folder(
    *,
    out: Path,
    merchant_id: str,
    events: pd.DataFrame,
    split: TimeSplit,
    epsilon_cap: float,
    privacy_unit: PrivacyUnit,
    platform_key: Path | None = None,
) -> MerchantFolder:
    """Build the whole folder next to ``out`` and rename it into place; all or nothing."""
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; pick a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    final = MerchantFolder(out, merchant_id)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = MerchantFolder(work, merchant_id)
        parts = split.split(events)
        for part in ("train", "valid", "test"):
            if parts[part].empty:
                raise ConfigError(
                    f"merchant {merchant_id}: no events in the {part} period "
                    f"({split.periods()[part].describe()}); change the split"
                )
        _populate(
            staged,
            final,
            parts,
            cohort=split.cohort(),
            epsilon_cap=epsilon_cap,
            privacy_unit=privacy_unit,
            platform_key=platform_key,
        )
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def _populate(
    staged: MerchantFolder,
    final: MerchantFolder,
    parts: dict[str, pd.DataFrame],
    *,
    cohort: str,
    epsilon_cap: float,
    privacy_unit: PrivacyUnit,
    platform_key: Path | None,
) -> None:
    """Write every file under ``staged``; ``merchant.toml`` already names ``final``'s paths."""
    staged.state.mkdir(mode=0o700)
    ensure_merchant_secret(staged.state)
    write_events(parts["train"], staged.events)
    staged.holdout("valid").parent.mkdir(mode=0o700)
    for part in ("valid", "test"):
        write_events(parts[part], staged.holdout(part))
    keys.generate_keypair(staged.keys, name=staged.merchant_id)
    certs.generate_node_key(out=staged.keys, name=staged.merchant_id)
    if platform_key is not None:
        keys.load_verify_key(platform_key)  # a readable Ed25519 public key, or a clear error
        shutil.copyfile(platform_key, staged.root / PLATFORM_KEY)
    config = MerchantConfig(
        id=final.merchant_id,
        data=final.events,
        state_dir=final.state,
        signing_key=final.ledger_private_key,
        epsilon_cap=epsilon_cap,
        privacy_unit=privacy_unit,
        cohort=cohort,
        validation_data=final.holdout("valid"),
        test_data=final.holdout("test"),
        platform_key=final.root / PLATFORM_KEY if platform_key is not None else None,
    )
    atomic_write_bytes(staged.config, config.to_toml().encode())


def run_init(args: argparse.Namespace) -> int:
    certs.validate_name(args.id)
    check_output_directory(args.out, "--out")
    events = read_own_events(args.events, args.id, parse_mapping(args.map))
    split = time_split(events, args)
    folder = create_merchant_folder(
        out=args.out,
        merchant_id=args.id,
        events=events,
        split=split,
        epsilon_cap=args.epsilon_cap,
        privacy_unit=PrivacyUnit(args.privacy_unit),
        platform_key=args.platform_key,
    )
    print(f"merchant {args.id}: created {folder.root}")
    for line in summarize(events).lines():
        print(f"  {line}")
    print(f"  split:     {split.describe()}")
    print(f"  held out:  {folder.holdout('valid')}, {folder.holdout('test')}")
    print("kept here, never sent (mode 600):")
    print(f"  {folder.node_private_key}  SuperNode key (fedshop client --node-key)")
    print(f"  {folder.ledger_private_key}  ledger signing key")
    print(f"  {folder.state / SECRET_FILE}  secret that seeds its DP noise and sampling")
    print("send to the platform's operator (public; compare fingerprints by phone or chat):")
    node_key = certs.load_node_public_key(folder.node_public_key)
    print(f"  {folder.node_public_key}  fingerprint {certs.public_key_fingerprint(node_key)}")
    ledger_key = keys.load_verify_key(folder.ledger_public_key)
    print(f"  {folder.ledger_public_key}  fingerprint sha256:{keys.key_fingerprint(ledger_key)}")
    print(f"start it: fedshop client --config {folder.config} --superlink HOST:PORT \\")
    print(f"    --ca-cert ca.crt --node-key {folder.node_private_key}")
    return 0
