"""The HTML report: verdict first, then each merchant's epsilon chart against its cap, then the
tables; self-contained (no URLs, no scripts) and drawn by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_ledger_support import build_ledger, make_release, true_epsilons

from common.audit.chart import OVER_CAP, PALETTE, cohort_points, merchant_panel
from common.keys import load_signing_key
from common.ledger import MerchantLedger
from simulations.cli import main

sys.path.insert(0, str(Path(__file__).parent / "support"))
from png_pixels import rgb_rows

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "audit-report.png"


def _federation(root: Path) -> list[str]:
    """Two merchants, two cohorts for m1; returns the CLI input flags."""
    build_ledger(root, "m1", 3)
    build_ledger(root, "m2", 2)
    key = load_signing_key(root / "keys" / "m1.key")
    with MerchantLedger.open(root / "m1.sqlite", merchant_id="m1", signing_key=key) as ledger:
        ledger.append(make_release("m1", 4, cohort="stream:w45", epsilon_after=0.9, epsilon_cap=1))
    return [
        "--ledger",
        str(root / "m1.sqlite"),
        str(root / "m2.sqlite"),
        "--keys",
        str(root / "keys"),
    ]


def _report(tmp_path: Path) -> Path:
    out = tmp_path / "report.html"
    assert main(["audit", "report", "--html", str(out), *_federation(tmp_path)]) == 0
    return out


def test_chart_points_follow_the_ledger_per_cohort(tmp_path: Path) -> None:
    _federation(tmp_path)
    with MerchantLedger.open(
        tmp_path / "m1.sqlite",
        merchant_id="m1",
        signing_key=load_signing_key(tmp_path / "keys" / "m1.key"),
    ) as ledger:
        chain = ledger.entries()
    points = cohort_points(chain)
    assert [(p.release, p.epsilon, p.cap) for p in points["train:w01-w40"]] == [
        (r, true_epsilons(r)[0], 8.0) for r in (1, 2, 3)
    ]
    assert [(p.release, p.epsilon, p.cap) for p in points["stream:w45"]] == [(4, 0.9, 1.0)]
    panel = merchant_panel("m1", chain)
    assert panel.count("<polyline") == 2 and panel.count('class="cap"') == 2
    assert 'class="panel within-cap"' in panel and OVER_CAP not in panel


def test_a_release_over_its_cap_is_marked_and_named_in_the_verdict(tmp_path: Path) -> None:
    build_ledger(tmp_path, "m1", 1)
    key = load_signing_key(tmp_path / "keys" / "m1.key")
    with MerchantLedger.open(tmp_path / "m1.sqlite", merchant_id="m1", signing_key=key) as ledger:
        # the ledger refuses to record a release over its cap; a cohort whose cap was lowered
        # later is what an auditor can still meet
        ledger.append(make_release("m1", 2, cohort="c2", epsilon_after=0.9, epsilon_cap=1.0))
        chain = ledger.entries()
    from dataclasses import replace

    lowered = [replace(e, release=replace(e.release, epsilon_cap=0.5)) for e in chain]
    panel = merchant_panel("m1", lowered)
    assert 'class="panel over-cap"' in panel and f'fill="{OVER_CAP}"' in panel


def test_report_opens_with_verdict_then_chart_then_tables(tmp_path: Path) -> None:
    text = _report(tmp_path).read_text()
    assert not re.search(r"(https?:|//[a-z]|src=|@import|url\(|<script)", text, re.IGNORECASE)
    verdict, chart = text.index('id="verdict"'), text.index('id="epsilon-chart"')
    assert verdict < chart < text.index('id="budgets"') < text.index('id="recompute"')
    assert "VERIFIED: 6 entries of 2 merchants" in text
    assert "entries record less epsilon than dp-accounting computes" in text  # made-up epsilons
    budgets = text[text.index('id="budgets"') : text.index('id="recompute"')]
    assert budgets.count('<tr class="row">') == 3  # m1 two cohorts, m2 one
    assert "stream:w45" in budgets
    assert text.count('<svg class="panel') == 2 and text.count("<polyline") == 3
    assert '<tr class="row">' in text[text.index('id="recompute"') :]


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={tmp / 'profile'}",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _hex(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def screenshot(report: Path, shot: Path, *, tmp: Path, size: str = "1000,700") -> Path:
    proc = _chromium(f"--screenshot={shot}", f"--window-size={size}", report.as_uri(), tmp=tmp)
    assert shot.exists(), proc.stderr[-2000:]
    return shot


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="run tests/support/ensure_chromium.sh")
def test_report_chart_is_drawn_in_headless_chromium(tmp_path: Path) -> None:
    report = _report(tmp_path)
    shot = screenshot(report, tmp_path / "report.png", tmp=tmp_path)
    shutil.copy(shot, Path("/tmp/fedshop_report_screenshot.png"))  # for a human look
    rows = rgb_rows(shot, max_rows=600)  # the verdict and the chart fill the first screen
    seen = {pixel for row in rows for pixel in row}
    drawn = {colour for colour in PALETTE[:2] if _hex(colour) in seen}
    assert drawn == set(PALETTE[:2]), "the two cohort lines of m1 are not on the screen"
    dom = _chromium("--dump-dom", report.as_uri(), tmp=tmp_path).stdout
    assert dom.count('<svg class="panel') == 2 and "VERIFIED" in dom
    assert dom.count('<tr class="row">') >= 3 + 4
