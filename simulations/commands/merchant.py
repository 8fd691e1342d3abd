"""``fedshop merchant init``: everything one merchant needs, in one folder, in one step.

The folder holds the merchant's imported events, its ``merchant.toml``, its SuperNode key
(``NAME.node.key``), its ledger signing key (``NAME.key``) and its state directory. It is
built in a temporary folder next to the destination and renamed into place at the end, so a
failure (a bad row in the events, a full disk) leaves nothing behind. The command ends by
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

from client.merchant import MerchantConfig
from common import certs, keys
from common.accounting import PrivacyUnit
from common.atomic import atomic_write_bytes
from common.errors import ConfigError, DataValidationError
from common.events import MERCHANT_ID, read_events, summarize, write_events
from simulations.commands.data import parse_mapping

EVENTS_FILE = "events.parquet"
CONFIG_FILE = "merchant.toml"
KEYS_DIR = "keys"
STATE_DIR = "state"


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


def create_merchant_folder(
    *,
    out: Path,
    merchant_id: str,
    events: pd.DataFrame,
    epsilon_cap: float,
    privacy_unit: PrivacyUnit,
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
        _populate(staged, final, events, epsilon_cap=epsilon_cap, privacy_unit=privacy_unit)
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
    events: pd.DataFrame,
    *,
    epsilon_cap: float,
    privacy_unit: PrivacyUnit,
) -> None:
    """Write every file under ``staged``; ``merchant.toml`` already names ``final``'s paths."""
    staged.state.mkdir(mode=0o700)
    write_events(events, staged.events)
    keys.generate_keypair(staged.keys, name=staged.merchant_id)
    certs.generate_node_key(out=staged.keys, name=staged.merchant_id)
    # TODO(dp-secret): create the merchant's secret for DP randomness here with
    # client.dp_randomness.ensure_merchant_secret(staged.state) once that function is on main.
    config = MerchantConfig(
        id=final.merchant_id,
        data=final.events,
        state_dir=final.state,
        signing_key=final.ledger_private_key,
        epsilon_cap=epsilon_cap,
        privacy_unit=privacy_unit,
    )
    atomic_write_bytes(staged.config, config.to_toml().encode())


def run_init(args: argparse.Namespace) -> int:
    certs.validate_name(args.id)
    events = read_own_events(args.events, args.id, parse_mapping(args.map))
    folder = create_merchant_folder(
        out=args.out,
        merchant_id=args.id,
        events=events,
        epsilon_cap=args.epsilon_cap,
        privacy_unit=PrivacyUnit(args.privacy_unit),
    )
    print(f"merchant {args.id}: created {folder.root}")
    for line in summarize(events).lines():
        print(f"  {line}")
    print("kept here, never sent (mode 600):")
    print(f"  {folder.node_private_key}  SuperNode key (fedshop client --node-key)")
    print(f"  {folder.ledger_private_key}  ledger signing key")
    print("send to the platform's operator (public; compare fingerprints by phone or chat):")
    node_key = certs.load_node_public_key(folder.node_public_key)
    print(f"  {folder.node_public_key}  fingerprint {certs.public_key_fingerprint(node_key)}")
    ledger_key = keys.load_verify_key(folder.ledger_public_key)
    print(f"  {folder.ledger_public_key}  fingerprint sha256:{keys.key_fingerprint(ledger_key)}")
    print(f"start it: fedshop client --config {folder.config} --superlink HOST:PORT \\")
    print(f"    --ca-cert ca.crt --node-key {folder.node_private_key}")
    return 0
