"""The platform's offline run as a service: settings from a run config, rounds, final test.

Used by the Flower entry point (server/app.py), by the online loop (server/online.py) and by
simulations; it returns everything it produced, so callers never read its files back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from common.atomic import atomic_write_bytes, atomic_write_json
from common.config import RunConfig
from common.errors import ConfigError
from common.ledger import ServerLedger
from common.protocol import LOCAL_SUFFIX, EvalPart
from server.federation import GLOBAL, Federation, ServerSettings, write_final_model
from server.reporting import round_table, write_metrics, write_plots

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class PlatformResult:
    """What an offline run produced: the summary (also in summary.json) and the final model."""

    summary: dict[str, Any]
    history: list[dict[str, Any]]
    arrays: Arrays | None  # None when the run stopped early

    @property
    def completed(self) -> bool:
        return bool(self.summary["completed"])


RUN_CONFIG_KEYS = ("fedshop-config", "run-dir", "keys-dir", "server-ledger", "simulation-dir")


def settings_from_run_config(run_config: dict[str, Any]) -> ServerSettings:
    """ServerSettings from Flower's run config (``flwr run`` / deployment)."""

    def path(key: str, required: bool = True) -> Path | None:
        value = str(run_config.get(key, "") or "")
        if not value:
            if required:
                raise ConfigError(f"run config key {key!r} is required")
            return None
        return Path(value)

    config_path, run_dir, keys_dir = path("fedshop-config"), path("run-dir"), path("keys-dir")
    assert config_path and run_dir and keys_dir
    settings = ServerSettings(
        config=RunConfig.from_toml(config_path),
        run_dir=run_dir,
        keys_dir=keys_dir,
        ledger_path=path("server-ledger", False) or run_dir / "server" / "ledger.sqlite",
        simulation_dir=path("simulation-dir", False),
    )
    run_id_file = run_dir / "run-id"
    if run_id_file.exists():
        settings = replace(settings, run_id=run_id_file.read_text().strip())
    return settings


TEST_LABELS = (GLOBAL, GLOBAL + LOCAL_SUFFIX, "p-topfreq", "g-topfreq")


def final_test(federation: Federation, arrays: Arrays, *, rnd: int) -> dict[str, Any]:
    """The merchants' test of the final model: the shared model, the shared model with each
    merchant's local part (what it serves), and the merchants' local baselines, on the same
    cases; overall means with 95 % intervals, and each merchant's own means."""
    began = time.perf_counter()
    test = federation.evaluate(
        {GLOBAL: arrays}, tuple((EvalPart.TEST, label) for label in TEST_LABELS), rnd=rnd
    )
    methods: dict[str, Any] = {}
    for label in TEST_LABELS:
        overall = test.overall(EvalPart.TEST, label)
        methods[label] = {
            "means": overall.means(),
            "ci95": {name: list(v.ci95()) for name, v in overall.metrics.items()},
            "per_merchant": test.per_merchant(EvalPart.TEST, label),
        }
    return {
        "test": test.means(EvalPart.TEST, GLOBAL),
        "test_cases": test.cases(EvalPart.TEST, GLOBAL),
        "test_per_merchant": test.per_merchant(EvalPart.TEST, GLOBAL),
        "test_case_counts": {
            merchant: by_part[EvalPart.TEST][GLOBAL].cases
            for merchant, by_part in sorted(test.sums.items())
            if EvalPart.TEST in by_part and GLOBAL in by_part[EvalPart.TEST]
        },
        "test_methods": methods,
        "test_seconds": round(time.perf_counter() - began, 2),
    }


def run_platform(
    grid: Grid, settings: ServerSettings, ledger: ServerLedger | None = None
) -> PlatformResult:
    """Offline rounds (resumable), then the merchants' federated test of the final model."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.ledger_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(settings.run_dir / "run-id", settings.run_id.encode())
    federation = Federation(grid, settings)
    owned = ledger is None
    ledger = ledger or ServerLedger.open(settings.ledger_path)
    try:
        result = federation.run(ledger)
    finally:
        if owned:
            ledger.close()
    history = result["history"]
    summary: dict[str, Any] = {
        "run_id": settings.run_id,
        "completed": result["completed"],
        "rounds": len(history),
        "aggregated_rounds": sum(1 for row in history if row["aggregated"]),
    }
    arrays = result["arrays"] if result["completed"] else None
    if arrays is not None:
        summary["model_sha256"] = write_final_model(settings.run_dir, arrays)
        summary.update(final_test(federation, arrays, rnd=len(history)))
    if history:
        write_metrics(settings.run_dir, history, summary)
        write_plots(settings.run_dir, history, settings.config.privacy.epsilon_cap)
        log.debug("per-round results:\n%s", round_table(history))  # the CLI prints it once
    atomic_write_json(settings.run_dir / "summary.json", summary)
    return PlatformResult(summary=summary, history=history, arrays=arrays)
