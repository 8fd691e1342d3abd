"""Helpers shared by the ledger and audit tests (no tests here)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from common.accounting import AccountantKind, MechanismStep, PrivacyUnit, epsilon_spent
from common.keys import generate_keypair, load_signing_key
from common.ledger import MECHANISM, NOISE_SOURCE, LedgerEntry, MerchantLedger, PrivacyRelease

COHORT = "train:w01-w40"


def true_epsilons(round: int, *, sigma: float = 1.0, q: float = 0.0256, steps: int = 39):
    """(PLD, RDP) epsilon after ``round`` rounds of ``steps`` steps each at delta 1e-5."""
    history = [MechanismStep(sigma, q, steps * round)]
    return (
        epsilon_spent(history, delta=1e-5),
        epsilon_spent(history, delta=1e-5, accountant=AccountantKind.RDP),
    )


def make_release(merchant_id: str = "m1", round: int = 1, **changes: Any) -> PrivacyRelease:
    """Round ``round`` of a run whose rounds 1..round all trained on one cohort; the epsilons
    are the true ones for that history unless ``changes`` says otherwise."""
    # true epsilons for plausible round numbers; property tests may ask for absurd ones
    pld, rdp = true_epsilons(round) if isinstance(round, int) and 1 <= round <= 1000 else (0.5, 0.6)
    fields: dict[str, Any] = dict(
        merchant_id=merchant_id,
        run_id="run-1",
        round=round,
        model_in_sha256="a" * 64,
        model_out_sha256=f"{round:064x}",
        cohort=COHORT,
        privacy_unit=PrivacyUnit.EVENT,
        mechanism=MECHANISM,
        noise_source=NOISE_SOURCE,
        noise_multiplier=1.0,
        sample_rate=0.0256,
        steps=39,
        clipping_norm=1.0,
        delta=1e-5,
        dataset_size=10_000,
        accountant=AccountantKind.PLD,
        epsilon_after=pld,
        epsilon_rdp=rdp,
        epsilon_cap=8.0,
        config_sha256="c" * 64,
        library_versions={"opacus": "1.6.0", "torch": "2.13.0"},
        created_utc=f"2026-11-23T12:{round % 60:02d}:00.000001Z",
    )
    fields.update(changes)
    return PrivacyRelease(**fields)


def build_ledger(directory: Path, merchant_id: str, rounds: int) -> tuple[Path, list[LedgerEntry]]:
    """A key pair in ``directory/keys`` and a merchant ledger with ``rounds`` releases."""
    keys = directory / "keys"
    private, _ = generate_keypair(keys, name=merchant_id)
    path = directory / f"{merchant_id}.sqlite"
    with MerchantLedger.open(
        path, merchant_id=merchant_id, signing_key=load_signing_key(private)
    ) as ledger:
        entries = [ledger.append(make_release(merchant_id, r)) for r in range(1, rounds + 1)]
    return path, entries


def ledger_contents(path: Path) -> tuple[list[tuple[Any, ...]], ...]:
    """What a ledger file holds, read from its tables without their indexes: the entries in
    storage order (without ``pos``, which only orders them), the meta rows and the catalogue."""
    conn = sqlite3.connect(path)
    try:
        return (
            conn.execute(
                "SELECT merchant_id, seq, release_json, prev_hash, entry_hash, signature "
                "FROM entries NOT INDEXED ORDER BY pos"
            ).fetchall(),
            conn.execute("SELECT key, value FROM meta NOT INDEXED ORDER BY rowid").fetchall(),
            conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall(),
        )
    finally:
        conn.close()
