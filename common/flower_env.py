"""The environment that keeps Flower and Ray offline, in one place.

Without it Flower sends telemetry and checks for updates, the SuperLink installs each run's
dependencies with ``uv sync`` (pulling a multi-GB CUDA torch), and Ray reports usage. Every
process that starts Flower gets these values: the CLI, the deployment supervisor, the tests;
the Makefile exports the same ones (tests/test_flower_env.py keeps them in step).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

QUIET_FLOWER_ENV: Mapping[str, str] = MappingProxyType(
    {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
)


def quiet_flower_environment() -> None:
    """Set the quiet values in this process's environment, keeping any the caller chose."""
    for key, value in QUIET_FLOWER_ENV.items():
        os.environ.setdefault(key, value)
