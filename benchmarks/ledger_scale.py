"""Ledger scale: M merchants x N releases; time `audit verify` and `audit budgets`.

Builds signed merchant ledgers and a server ledger holding the same entries (one SQLite
transaction per file, so building is fast; real appends fsync each entry), then times the
auditor's one-pass verification (hashes, links, every signature, merchant vs server copy) and
the budget table. Writes docs/ledger_scale.md.
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
    LedgerEntry,
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
        noise_multiplier=1.1,
        sample_rate=0.01,
        steps=100,
        clipping_norm=1.0,
        delta=1e-6,
        dataset_size=25_000,
        accountant=AccountantKind.RDP,
        epsilon_after=0.001 * round,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--merchants", type=int, default=100)
    parser.add_argument("--releases", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ledger_scale.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = build(root, args.merchants, args.releases)
        built = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in root.glob("*.sqlite"))
        t0 = time.perf_counter()
        result = audit_ledgers(paths, keys_dir=root / "keys", server_ledger=root / "server.sqlite")
        verify_s = time.perf_counter() - t0
        assert result.ok and result.entries == args.merchants * args.releases, result.problem
        t0 = time.perf_counter()
        unsigned = audit_ledgers(paths, keys_dir=None, server_ledger=root / "server.sqlite")
        rows = budget_rows(unsigned.chains)
        budgets_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        budget_rows(result.chains)
        table_s = time.perf_counter() - t0
    entries = args.merchants * args.releases
    report = f"""# Ledger scale

Measured by `python benchmarks/ledger_scale.py --merchants {args.merchants} \\
--releases {args.releases}` on {platform.machine()} with {os.cpu_count()} cores
(Python {platform.python_version()}), a machine shared with other work, so treat the numbers
as upper bounds.

| What | Value |
|---|---|
| merchants x releases | {args.merchants} x {args.releases} = {entries} entries |
| ledger files (merchants + server copy) | {size / 2**20:.1f} MiB |
| building the files (sign + one transaction per file) | {built:.1f} s |
| `audit verify` (every hash, link and signature; server copy compared) | {verify_s:.1f} s |
| `audit budgets` without `--keys` (hashes and links, then the table) | {budgets_s:.1f} s |
| budget table alone, from verified chains | {table_s:.2f} s |
| budget rows (merchant x cohort) | {len(rows)} |

Verification reads each file once in one query, checks each merchant chain from its genesis,
and compares the server's copy with the merchants' copies byte for byte, so entries present in
both are verified once. Ed25519 signature checks dominate the verify time.
"""
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
