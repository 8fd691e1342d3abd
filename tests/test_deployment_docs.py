"""docs/deployment.md's "Try it on one machine", run the way a new operator would run it.

The slow test reads the bash block from the docs and runs it unchanged (only the trial
folder, the ports and the paths of the ``fedshop`` and ``python`` executables come from the
environment, as the block allows), so the docs cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import pytest

from common.config import RunConfig
from simulations.deployment.process import QUIET_FLOWER_ENV, free_port

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "deployment.md"
MARKER = "# loopback trial"


def trial_block() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    found = [block for block in blocks if block.startswith(MARKER)]
    assert len(found) == 1, f"expected one bash block starting with {MARKER!r} in {DOC}"
    return found[0]


def test_the_docs_hold_the_trial_and_a_valid_run_config_example() -> None:
    script = trial_block()
    for step in ("certs init", "merchant init", "server ", "client "):
        assert f"$FEDSHOP {step}" in script
    assert RunConfig.from_toml(REPO / "docs" / "run.toml") == RunConfig()


@pytest.mark.slow
def test_a_new_operator_completes_a_run_by_following_the_docs(tmp_path: Path) -> None:
    from client.merchant import MerchantConfig
    from common.keys import load_signing_key
    from common.ledger import MerchantLedger

    trial = tmp_path / "trial"
    env = dict(os.environ)
    env.update(QUIET_FLOWER_ENV)
    env.update(
        TRIAL=str(trial),
        PORT=str(free_port()),
        CONTROL_PORT=str(free_port()),
        FEDSHOP=str(Path(sys.executable).parent / "fedshop"),
        PYTHON=sys.executable,
    )
    log = tmp_path / "trial.log"
    with log.open("wb") as out:
        shell = subprocess.Popen(
            ["bash", "-c", trial_block()],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = shell.wait(timeout=1500)
        finally:
            with suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGTERM)
    output = log.read_text(errors="replace")
    assert code == 0, output[-5000:]
    assert "round 1/2 |" in output and "round 2/2 |" in output, output[-3000:]
    run = trial / "platform" / "run"
    summary = (run / "summary.json").read_text()
    assert '"completed": true' in summary
    import json

    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    merchants = sorted(p.name for p in (trial / "merchants").iterdir())
    assert len(merchants) == 3
    assert [r["trained"] for r in rounds] == [merchants, merchants]
    for name in merchants:
        config = MerchantConfig.from_toml(trial / "merchants" / name / "merchant.toml")
        with MerchantLedger.open(
            config.ledger_path, merchant_id=name, signing_key=load_signing_key(config.signing_key)
        ) as ledger:
            assert len(list(ledger.entries())) == 2
