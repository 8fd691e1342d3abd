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
from common.errors import CheckpointError, TrainingError
from server.federation import ServerSettings
from simulations.provision import RunLayout

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


def simulate(
    layout: RunLayout, *, stop_after_round: int | None = None, num_cpus_per_client: float = 1.0
) -> dict[str, Any]:
    """Run (or resume) the federation of ``layout``; returns the run summary."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import build_server_app

    settings = server_settings(layout, stop_after_round=stop_after_round)
    (layout.root / "summary.json").unlink(missing_ok=True)
    cpus = os.cpu_count() or 2
    run_simulation(
        server_app=build_server_app(settings),
        client_app=client_app,
        num_supernodes=len(layout.merchant_ids()),
        backend_config={
            "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False},
        },
    )
    summary_path = layout.root / "summary.json"
    if not summary_path.exists():
        raise TrainingError(
            f"the simulation ended without a summary in {layout.root}; see the log above"
        )
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    if summary["completed"] and summary.get("aggregated_rounds", 0) == 0:
        raise TrainingError(
            f"no round had enough usable merchant updates; the model was never trained "
            f"(reasons per round in {layout.root / 'metrics.json'})"
        )
    return summary


def resume_layout(root: Path) -> RunLayout:
    layout = RunLayout(root.resolve())
    if not layout.config.exists():
        raise CheckpointError(f"{root} is not a fedshop run directory (no config.toml)")
    return layout
