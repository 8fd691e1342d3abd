"""The HTML report: self-contained (no URLs), tables and plots, rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from test_ledger_support import build_ledger, make_release

from common.keys import load_signing_key
from common.ledger import MerchantLedger
from simulations.cli import main as run_cli

CHROMIUM = Path("/usr/bin/chromium")


def _federation(root: Path) -> list[str]:
    """Two merchants, two cohorts for m1; returns the CLI input flags."""
    build_ledger(root, "m1", 3)
    build_ledger(root, "m2", 2)
    key = load_signing_key(root / "keys" / "m1.key")
    with MerchantLedger.open(root / "m1.sqlite", merchant_id="m1", signing_key=key) as ledger:
        ledger.append(make_release("m1", 4, cohort="stream:w45", epsilon_after=0.9))
    return [
        "--ledger",
        str(root / "m1.sqlite"),
        str(root / "m2.sqlite"),
        "--keys",
        str(root / "keys"),
    ]


def _report(tmp_path: Path) -> Path:
    out = tmp_path / "report.html"
    assert run_cli(["audit", "report", "--html", str(out), *_federation(tmp_path)]) == 0
    return out


@pytest.mark.slow
def test_report_is_self_contained_with_tables_and_plots(tmp_path: Path) -> None:
    text = _report(tmp_path).read_text()
    assert not re.search(r"(https?:|//[a-z]|src=|@import|url\((?!#))", text, re.IGNORECASE)
    assert "VERIFIED: 6 entries of 2 merchants" in text
    budgets = text[text.index('id="budgets"') : text.index('id="recompute"')]
    assert budgets.count('<tr class="row">') == 3  # m1 two cohorts, m2 one
    assert "stream:w45" in budgets
    assert text.count('<div class="plot"') == 2 and text.count("<svg") == 2
    assert '<tr class="row">' in text[text.index('id="recompute"') :]


def _png_is_not_blank(path: Path) -> bool:
    """Decode the PNG's pixel bytes (stdlib only) and look for more than one colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    pixels = zlib.decompress(idat)
    return len(set(pixels[1000:200000:7])) > 8


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            f"--user-data-dir={tmp / 'profile'}",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="run tests/support/ensure_chromium.sh")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    report = _report(tmp_path)
    shot = tmp_path / "report.png"
    proc = _chromium(
        f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri(), tmp=tmp_path
    )
    assert shot.exists(), proc.stderr[-2000:]
    assert _png_is_not_blank(shot)
    keep = Path("/tmp/fedshop_report_screenshot.png")
    shutil.copy(shot, keep)  # for a human look
    dom = _chromium("--dump-dom", report.as_uri(), tmp=tmp_path).stdout
    assert dom.count('<tr class="row">') >= 3 + 4
    assert dom.count("<svg") == 2 and "VERIFIED" in dom
