"""Run a provisioned federation in Flower's simulation engine (Ray): many merchants, one machine."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.errors import CheckpointError, FedshopError
from server.federation import ServerSettings
from simulations.console import quiet_flower, ray_init_args
from simulations.provision import RunLayout
from simulations.watched_grid import watched

log = logging.getLogger(__name__)


def server_settings(layout: RunLayout, *, stop_after_round: int | None = None) -> ServerSettings:
    config = RunConfig.from_toml(layout.config)
    run_id_file = layout.root / "run-id"
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:12]
    settings = ServerSettings(
        config=config,
        run_dir=layout.root,
        keys_dir=layout.keys,
        ledger_path=layout.server / "ledger.sqlite",
        validation_set=_existing(layout.server / "eval-valid.npz"),
        test_set=_existing(layout.server / "eval-test.npz"),
        simulation_dir=layout.root,
        stop_after_round=stop_after_round,
    )
    return replace(settings, run_id=run_id)


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def backend_config(*, num_cpus_per_client: float, verbose: bool) -> dict[str, Any]:
    """Flower's simulation back-end options: one CPU per merchant, quiet Ray unless verbose."""
    return {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 2, **ray_init_args(verbose=verbose)},
    }


def simulate(
    layout: RunLayout,
    *,
    stop_after_round: int | None = None,
    num_cpus_per_client: float = 1.0,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the federation of ``layout``; returns the run summary with the
    per-round ``history``."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import run_platform
    from server.checkpoint import load_latest

    settings = server_settings(layout, stop_after_round=stop_after_round)
    latest = load_latest(settings.checkpoints)
    first_round = 1 if latest is None else latest.round + 1
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rounds = settings.config.federation.rounds
        with watched(grid, rounds=rounds, first_round=first_round) as shown:
            result.update(run_platform(shown, settings))

    quiet_flower(verbose=verbose)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(layout.merchant_ids()),
        backend_config=backend_config(num_cpus_per_client=num_cpus_per_client, verbose=verbose),
    )
    if not result:
        raise FedshopError(
            f"the simulation ended without a summary in {layout.root}; see the log above"
        )
    if result["completed"] and result.get("aggregated_rounds", 0) == 0:
        raise FedshopError(
            f"no round had enough usable merchant updates; the model was never trained "
            f"(reasons per round in {layout.root / 'metrics.json'})"
        )
    history = json.loads((layout.root / "metrics.json").read_text())["rounds"]
    return {**result, "history": history}


def resume_layout(root: Path) -> RunLayout:
    layout = RunLayout(root.resolve())
    if not layout.config.exists():
        raise CheckpointError(f"{root} is not a fedshop run directory (no config.toml)")
    return layout
