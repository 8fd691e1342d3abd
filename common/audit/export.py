"""Export verified ledger entries as JSON or CSV for other tools."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from enum import Enum

from common.ledger import LedgerEntry

COLUMNS = (
    "merchant_id",
    "seq",
    "run_id",
    "round",
    "cohort",
    "privacy_unit",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "clipping_norm",
    "delta",
    "dataset_size",
    "accountant",
    "epsilon_after",
    "epsilon_rdp",
    "epsilon_cap",
    "noise_source",
    "model_in_sha256",
    "model_out_sha256",
    "config_sha256",
    "created_utc",
    "entry_hash",
)


class ExportFormat(Enum):
    JSON = "json"
    CSV = "csv"


def _flat(entry: LedgerEntry) -> dict[str, object]:
    release = entry.release.to_dict()
    row = {name: release.get(name) for name in COLUMNS}
    row["seq"] = entry.seq
    row["entry_hash"] = entry.entry_hash
    return row


def export_entries(chains: Mapping[str, Sequence[LedgerEntry]], fmt: ExportFormat) -> str:
    """JSON: a list of full wire entries; CSV: one flat row per entry (COLUMNS)."""
    entries = [e for m in sorted(chains) for e in chains[m]]
    if fmt is ExportFormat.JSON:
        return json.dumps([json.loads(e.to_wire()) for e in entries], indent=1, sort_keys=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow(_flat(entry))
    return buffer.getvalue()
