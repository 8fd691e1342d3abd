"""The Makefile exports exactly the quiet Flower/Ray environment the Python code uses."""

from __future__ import annotations

import os
import re
from pathlib import Path

from common.flower_env import QUIET_FLOWER_ENV

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"
EXPORT = re.compile(r"^export\s+([A-Z_][A-Z0-9_]*)\s*:?=\s*(\S*)\s*$")


def test_makefile_exports_match_the_constant() -> None:
    exports = {}
    for line in MAKEFILE.read_text(encoding="utf-8").splitlines():
        found = EXPORT.match(line)
        if found:
            exports[found.group(1)] = found.group(2)
    flower = {k: v for k, v in exports.items() if k.startswith(("FLWR_", "RAY_"))}
    assert flower == dict(QUIET_FLOWER_ENV)


def test_the_test_session_runs_quiet() -> None:
    for key, value in QUIET_FLOWER_ENV.items():
        assert os.environ.get(key) == value, key
