"""Independent recomputation with dp-accounting: golden values and flags."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_ledger_support import make_release

from common.accounting import AccountantKind, MechanismStep, PrivacyUnit, epsilon_spent
from common.audit.recompute import final_rows, pld_epsilon, recompute_all, recompute_chain
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


def test_golden_values_and_flags(tmp_path: Path) -> None:
    base = {"noise_multiplier": 1.0, "sample_rate": 0.0256, "steps": 390, "epsilon_rdp": 3.634}
    entries = _entries(
        tmp_path,
        [
            {**base, "cohort": "a", "epsilon_after": 3.0},  # under-reported: flagged
            {**base, "cohort": "b", "epsilon_after": 3.213},  # the merchant's PLD: fine
            {**base, "cohort": "c", "epsilon_after": 3.213, "epsilon_rdp": 3.5},  # RDP too low
        ],
    )
    rows = recompute_all({"m1": entries})
    assert [r.cohort for r in rows] == ["a", "b", "c"]
    for row in rows:
        assert row.rdp == pytest.approx(GOLDEN_RDP, abs=2e-3)
        assert row.pld == pytest.approx(GOLDEN_PLD, abs=2e-3)
    assert rows[0].flags and "below PLD" in rows[0].flags[0]
    assert rows[1].flags == ()
    assert rows[2].flags and "RDP epsilon 3.5000 is below RDP" in rows[2].flags[0]
    # The training side's figures agree with the independent ones.
    history = [MechanismStep(1.0, 0.0256, 390)]
    assert epsilon_spent(history, delta=1e-5) == pytest.approx(rows[0].pld, abs=2e-3)
    assert epsilon_spent(history, delta=1e-5, accountant=AccountantKind.RDP) == pytest.approx(
        rows[0].rdp, abs=5e-3
    )


def test_true_figures_pass_and_compose_per_cohort(tmp_path: Path) -> None:
    """make_release states the true epsilons of rounds of one cohort: nothing is flagged."""
    entries = _entries(tmp_path, [{}, {}, {}])
    rows = recompute_chain("m1", entries)
    assert all(r.flags == () for r in rows)
    assert [r.pld for r in rows] == sorted(r.pld for r in rows)
    assert final_rows(rows) == [rows[-1]]


def test_customer_level_composes_across_cohorts_at_each_delta(tmp_path: Path) -> None:
    one = MechanismStep(1.0, 0.0256, 39)
    steps = [one, one]
    deltas = [1e-5, 1e-6]  # e.g. delta = 1/(10 x records) as the data grows
    stated = [epsilon_spent(steps[: i + 1], delta=deltas[i]) for i in range(2)]
    stated_rdp = [
        epsilon_spent(steps[: i + 1], delta=deltas[i], accountant=AccountantKind.RDP)
        for i in range(2)
    ]
    entries = _entries(
        tmp_path,
        [
            {
                "cohort": f"c{i}",
                "privacy_unit": PrivacyUnit.CUSTOMER,
                "delta": deltas[i],
                "epsilon_after": stated[i],
                "epsilon_rdp": stated_rdp[i],
            }
            for i in range(2)
        ],
    )
    rows = recompute_chain("m1", entries)
    assert [r.cohort for r in rows] == ["*", "*"] and all(r.flags == () for r in rows)
    assert rows[1].pld > epsilon_spent([one], delta=1e-6)  # the second composed the first


@pytest.mark.parametrize("sigma", [0.0, 1e-9, 0.25])
def test_no_or_too_little_noise_is_infinite_and_flagged(tmp_path: Path, sigma: float) -> None:
    """Below the accountable floor (0.3) a release is unbounded, whatever it recorded."""
    entries = _entries(tmp_path, [{"noise_multiplier": sigma, "epsilon_after": 1.0}])
    (row,) = recompute_chain("m1", entries)
    assert math.isinf(row.rdp) and math.isinf(row.pld)
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
