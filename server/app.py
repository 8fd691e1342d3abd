"""The platform's Flower ServerApp (Message API, custom main loop).

``flwr run`` / deployment: run-config keys ``fedshop-config`` (run TOML), ``run-dir``,
``keys-dir`` and optionally ``validation-set`` / ``test-set`` (evaluation archives),
``server-ledger`` and, for ``flwr run`` on a provisioned simulation, ``simulation-dir``.
Simulation builds the same app around a ready :class:`ServerSettings`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.errors import ConfigError
from common.model import Recommender, load_state_arrays
from server.checkpoint import atomic_write_bytes
from server.evaluation_set import EvaluationSet
from server.federation import Federation, ServerSettings, write_final_model
from server.reporting import round_table, write_metrics, write_plots

log = logging.getLogger(__name__)


def settings_from_run_config(run_config: dict[str, Any]) -> ServerSettings:
    def path(key: str, required: bool = True) -> Path | None:
        value = str(run_config.get(key, "") or "")
        if not value:
            if required:
                raise ConfigError(f"run config key {key!r} is required")
            return None
        return Path(value)

    config_path = path("fedshop-config")
    run_dir = path("run-dir")
    keys_dir = path("keys-dir")
    assert config_path and run_dir and keys_dir
    run_id_file = run_dir / "run-id"
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
    settings = ServerSettings(
        config=RunConfig.from_toml(config_path),
        run_dir=run_dir,
        keys_dir=keys_dir,
        ledger_path=path("server-ledger", False) or run_dir / "server" / "ledger.sqlite",
        validation_set=path("validation-set", False),
        test_set=path("test-set", False),
        simulation_dir=path("simulation-dir", False),
    )
    if run_id is not None:
        from dataclasses import replace

        settings = replace(settings, run_id=run_id)
    return settings


def run_platform(grid: Grid, settings: ServerSettings) -> dict[str, Any]:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(settings.run_dir / "run-id", settings.run_id.encode())
    result = Federation(grid, settings).run()
    history = result["history"]
    summary: dict[str, Any] = {
        "run_id": settings.run_id,
        "completed": result["completed"],
        "rounds": len(history),
        "aggregated_rounds": sum(1 for row in history if row["aggregated"]),
    }
    if result["completed"]:
        summary["model_sha256"] = write_final_model(settings.run_dir, result["arrays"])
        if settings.test_set is not None:
            model = Recommender(settings.config.model)
            load_state_arrays(model, result["arrays"])
            overall, per_merchant = EvaluationSet.load(settings.test_set).evaluate(model)
            summary["test"] = overall
            summary["test_per_merchant"] = per_merchant
    if history:
        write_metrics(settings.run_dir, history, summary)
        write_plots(settings.run_dir, history, settings.config.privacy.epsilon_cap)
        log.info("per-round results:\n%s", round_table(history))
    atomic_write_bytes(settings.run_dir / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


def build_server_app(settings: ServerSettings) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_platform(grid, settings)

    return server_app


app = ServerApp()


def log_to_run_log() -> None:
    """Give fedshop's loggers a handler on stderr, which flwr-serverapp copies into the run's
    log (`flwr log`, and the per-round lines `fedshop server` prints); without one, their
    INFO lines are dropped in a deployment."""
    for name in ("server", "common"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)-8s: %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_to_run_log()
    run_config = dict(context.run_config)
    from server.online import online_enabled, run_online_from_run_config

    if online_enabled(run_config):
        run_online_from_run_config(grid, run_config)
        return
    run_platform(grid, settings_from_run_config(run_config))
