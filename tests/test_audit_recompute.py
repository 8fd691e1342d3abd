"""Independent recomputation with dp-accounting: golden values and flags."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_ledger_support import make_release

from common.accounting import MechanismStep, epsilon_spent
from common.audit.recompute import final_rows, pld_epsilon, recompute_all, recompute_cohort
from common.keys import generate_keypair, load_signing_key
from common.ledger import LedgerEntry, MerchantLedger

# dp-accounting 0.6 computed outside the code under test (PLATFORM_NOTES: 3.63 RDP, 3.21 PLD):
# sigma=1.0, q=0.0256, 390 steps, delta=1e-5.
GOLDEN_RDP = 3.6339
GOLDEN_PLD = 3.2121


def _entries(tmp_path: Path, specs: list[dict[str, object]]) -> list[LedgerEntry]:
    private, _ = generate_keypair(tmp_path / "keys", name="m1")
    with MerchantLedger.open(
        tmp_path / "m1.sqlite", merchant_id="m1", signing_key=load_signing_key(private)
    ) as ledger:
        return [ledger.append(make_release("m1", i + 1, **spec)) for i, spec in enumerate(specs)]


@pytest.mark.slow
def test_golden_values_and_flags(tmp_path: Path) -> None:
    base = {"noise_multiplier": 1.0, "sample_rate": 0.0256, "steps": 390}
    entries = _entries(
        tmp_path,
        [
            {**base, "cohort": "a", "epsilon_after": 3.0},  # under-reported: flagged
            {**base, "cohort": "b", "epsilon_after": 3.20},  # within 0.02 of PLD: fine
            {**base, "cohort": "c", "epsilon_after": 3.634},  # the RDP value: fine
        ],
    )
    rows = recompute_all({"m1": entries})
    assert [r.cohort for r in rows] == ["a", "b", "c"]
    for row in rows:
        assert row.rdp == pytest.approx(GOLDEN_RDP, abs=2e-3)
        assert row.pld == pytest.approx(GOLDEN_PLD, abs=2e-3)
    assert rows[0].flags and "below PLD" in rows[0].flags[0]
    assert rows[1].flags == () and rows[2].flags == ()
    # Opacus (the training side) agrees with the independent RDP value.
    opacus = epsilon_spent([MechanismStep(1.0, 0.0256, 390)], delta=1e-5)
    assert opacus == pytest.approx(rows[0].rdp, abs=5e-3)


@pytest.mark.slow
def test_rdp_screen_skips_pld_for_conservative_entries(tmp_path: Path) -> None:
    steps = [MechanismStep(1.0, 0.0256, 39)] * 3
    rdp_values = [epsilon_spent(steps[: i + 1], delta=1e-5) for i in range(3)]
    entries = _entries(
        tmp_path,
        [
            {"steps": 39, "epsilon_after": rdp_values[i] + 0.001, "cohort": "train:x"}
            for i in range(3)
        ],
    )
    rows = recompute_cohort("m1", entries)
    assert [r.pld is None for r in rows] == [True, True, False]  # PLD only for the last
    assert all(r.flags == () for r in rows)
    assert [r.rdp for r in rows] == sorted(r.rdp for r in rows)
    assert final_rows(rows) == [rows[-1]]


def test_zero_noise_is_infinite_and_flagged(tmp_path: Path) -> None:
    entries = _entries(tmp_path, [{"noise_multiplier": 0.0, "epsilon_after": 1.0}])
    (row,) = recompute_cohort("m1", entries)
    assert math.isinf(row.rdp) and row.pld is not None and math.isinf(row.pld)
    assert row.flags
    assert math.isinf(pld_epsilon(entries, delta=1e-5))


def test_cli_recompute_reports_under_reporting_as_a_privacy_violation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.errors import ExitCode
    from simulations.cli import main

    _entries(tmp_path, [{"epsilon_after": 0.01}])  # the mechanism spends about 1.3 (PLD)
    argv = ["audit", "recompute", "--ledger", str(tmp_path / "m1.sqlite")]
    assert main([*argv, "--keys", str(tmp_path / "keys")]) == ExitCode.PRIVACY_VIOLATION
    captured = capsys.readouterr()
    assert "is below PLD" in captured.out
    assert captured.err.startswith("fedshop: error: 1 entries under-report epsilon")
