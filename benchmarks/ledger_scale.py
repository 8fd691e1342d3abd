"""Ledger scale: M merchants x N releases; time `audit verify` and `audit budgets`.

Builds signed merchant ledgers and a server ledger holding the same entries (one SQLite
transaction per file, so building is fast; real appends fsync each entry), then times the
auditor's verification (every hash, link and release; each chain's head signature; merchant vs
server copy), the budget table, and a merchant opening its own ledger (done once per round).
Reports wall-clock and CPU seconds and the load average, since the machine may be shared.
Writes docs/ledger_scale.md.
Usage: python benchmarks/ledger_scale.py [--merchants 100] [--releases 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.accounting import AccountantKind, PrivacyUnit  # noqa: E402
from common.audit.budgets import budget_rows  # noqa: E402
from common.audit.verify import audit_ledgers  # noqa: E402
from common.keys import generate_keypair, load_signing_key  # noqa: E402
from common.ledger import (  # noqa: E402
    GENESIS_HASH,
    KIND_MERCHANT,
    KIND_SERVER,
    MECHANISM,
    NOISE_SOURCE,
    LedgerEntry,
    MerchantLedger,
    PrivacyRelease,
    _insert,
    _open_store,
    seal,
)


def _release(merchant_id: str, round: int) -> PrivacyRelease:
    return PrivacyRelease(
        merchant_id=merchant_id,
        run_id=f"run-{round // 100}",
        round=round,
        model_in_sha256=f"{round:064x}",
        model_out_sha256=f"{round + 1:064x}",
        cohort=f"train:w{round % 4:02d}",
        privacy_unit=PrivacyUnit.EVENT,
        mechanism=MECHANISM,
        noise_source=NOISE_SOURCE,
        noise_multiplier=1.1,
        sample_rate=0.01,
        steps=100,
        clipping_norm=1.0,
        delta=1e-6,
        dataset_size=25_000,
        accountant=AccountantKind.PLD,
        epsilon_after=0.001 * round,
        epsilon_rdp=0.0012 * round,
        epsilon_cap=10.0,
        config_sha256="c" * 64,
        library_versions={"opacus": "1.6.0", "torch": "2.13.0", "flwr": "1.41.0"},
        created_utc=f"2026-11-23T12:00:{round % 60:02d}.000000Z",
    )


def build(root: Path, merchants: int, releases: int) -> list[Path]:
    keys = root / "keys"
    paths = []
    server, _ = _open_store(root / "server.sqlite", kind=KIND_SERVER, merchant_id=None)
    for m in range(merchants):
        merchant_id = f"merchant-{m:03d}"
        private, _ = generate_keypair(keys, name=merchant_id)
        key = load_signing_key(private)
        prev, entries = GENESIS_HASH, []
        for r in range(1, releases + 1):
            entry: LedgerEntry = seal(
                _release(merchant_id, r), seq=r, prev_hash=prev, signing_key=key
            )
            entries.append(entry)
            prev = entry.chain_hash()
        path = root / f"{merchant_id}.sqlite"
        conn, _ = _open_store(path, kind=KIND_MERCHANT, merchant_id=merchant_id)
        _insert(conn, path, entries)
        conn.close()
        _insert(server, root / "server.sqlite", entries)
        paths.append(path)
    server.close()
    return paths


class Timer:
    """Wall-clock and CPU seconds of a block (CPU time is what a loaded machine distorts least)."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def __str__(self) -> str:
        return f"{self.wall:.1f} s ({self.cpu:.1f} s CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--merchants", type=int, default=100)
    parser.add_argument("--releases", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ledger_scale.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with Timer() as built:
            paths = build(root, args.merchants, args.releases)
        size = sum(p.stat().st_size for p in root.glob("*.sqlite"))
        server = root / "server.sqlite"
        with Timer() as verify:
            result = audit_ledgers(paths, keys_dir=root / "keys", server_ledger=server)
        assert result.ok and result.entries == args.merchants * args.releases, result.problem
        with Timer() as budgets:
            unsigned = audit_ledgers(paths, keys_dir=None, server_ledger=server)
            rows = budget_rows(unsigned.chains)
        assert unsigned.ok, unsigned.problem
        with Timer() as table:
            budget_rows(result.chains)
        key = load_signing_key(root / "keys" / "merchant-000.key")
        with Timer() as opened:
            MerchantLedger.open(paths[0], merchant_id="merchant-000", signing_key=key).close()
    load_after = os.getloadavg()[0]
    entries = args.merchants * args.releases
    report = f"""# Ledger scale

Measured by `python benchmarks/ledger_scale.py --merchants {args.merchants} \\
--releases {args.releases}` on {platform.machine()} with {os.cpu_count()} cores
(Python {platform.python_version()}). The machine was shared with other work (load average
{load_before:.1f} before and {load_after:.1f} after, on {os.cpu_count()} cores), so wall-clock
times are upper bounds; CPU seconds are what the commands themselves cost.

| What | Time |
|---|---|
| merchants x releases | {args.merchants} x {args.releases} = {entries} entries |
| ledger files (merchants + server copy) | {size / 2**20:.1f} MiB |
| building the files (sign + one transaction per file) | {built} |
| `audit verify` (with `--keys` and `--server-ledger`) | {verify} |
| `audit budgets` without `--keys` (checks, then the table) | {budgets} |
| budget table alone, from verified chains | {table.wall:.2f} s |
| budget rows (merchant x cohort) | {len(rows)} |
| `MerchantLedger.open`, {args.releases} entries (once per round) | {opened.wall:.2f} s |

Verification reads each file once in one query and checks each merchant chain from its
genesis over the stored bytes: every `entry_hash`, every link and every release's fields, but
only the signature of each chain's last entry, which covers every earlier entry (see
[auditing.md](auditing.md)); only when something fails is the chain scanned entry by entry
to name the first bad entry. The server's copy is compared with the merchants' copies byte for
byte, so entries present in both are verified once. Checking every signature instead costs
about 0.2 ms per entry (about 20 s more here).
"""
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
