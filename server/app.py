"""The platform's Flower ServerApp (Message API, custom main loop).

``flwr run`` / deployment: run-config keys ``fedshop-config`` (run TOML), ``run-dir``,
``keys-dir``, optionally ``server-ledger`` and, for ``flwr run`` on a provisioned simulation,
``simulation-dir``; ``online = true`` adds the online fine-tuning loop (server/online.py).
Evaluation is federated: the platform holds no evaluation data.
"""

from __future__ import annotations

import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import ServerSettings
from server.online import online_enabled, run_online_from_run_config
from server.platform import PlatformResult, run_platform, settings_from_run_config


def build_server_app(
    settings: ServerSettings, results: list[PlatformResult] | None = None
) -> ServerApp:
    """A ServerApp around ready settings (simulation); ``results`` receives the run's result."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_platform(grid, settings)
        if results is not None:
            results.append(result)

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
    if online_enabled(run_config):
        run_online_from_run_config(grid, run_config)
        return
    run_platform(grid, settings_from_run_config(run_config))
