"""Run a provisioned federation: Flower's simulation engine (Ray) or the in-process grid."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any

from common.config import RunConfig, check_ray_address
from common.errors import CheckpointError, ConfigError, TrainingError
from server.federation import ServerSettings
from server.platform import PlatformResult
from simulations.console import quiet_flower, ray_init_args
from simulations.provision import RunLayout
from simulations.watched_grid import watched

log = logging.getLogger(__name__)


class Transport(Enum):
    """How messages reach the merchants' ClientApps in a simulation."""

    FLOWER = "flower"  # Flower's simulation engine: Ray actors, as `flwr run` does
    IN_PROCESS = "in-process"  # the same ClientApp called in this process (benchmarks, tests)


# Flower's simulation engine keeps pushed messages (each a copy of the model) in this process
# until a ClientApp actor takes them: enough to keep every actor of a large cluster busy, and
# a bound on memory whatever the number of merchants.
SIMULATION_IN_FLIGHT = 32


def server_settings(layout: RunLayout, *, stop_after_round: int | None = None) -> ServerSettings:
    config = RunConfig.from_toml(layout.config)
    run_id_file = layout.root / "run-id"
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:12]
    settings = ServerSettings(
        config=config,
        run_dir=layout.root,
        keys_dir=layout.keys,
        ledger_path=layout.server / "ledger.sqlite",
        simulation_dir=layout.root,
        stop_after_round=stop_after_round,
        max_in_flight=SIMULATION_IN_FLIGHT,
    )
    return replace(settings, run_id=run_id)


def backend_config(
    *, num_cpus_per_client: float, verbose: bool, ray_address: str = ""
) -> dict[str, Any]:
    """Flower's simulation back-end options: one CPU per merchant, quiet Ray unless verbose.

    Flower's Ray back-end passes ``init_args`` to ``ray.init`` as they are
    (flwr/server/superlink/fleet/vce/backend/raybackend.py, ``RayBackend.init_ray``): with
    ``address`` the driver joins that running cluster instead of starting a local one, and
    the actor pool is sized from every node's CPUs (``pool_size_from_resources``). Ray refuses
    ``num_cpus`` when joining a cluster: the cluster's nodes declared theirs at ``ray start``.
    """
    init_args: dict[str, Any] = dict(ray_init_args(verbose=verbose))
    if ray_address:
        init_args["address"] = check_ray_address(ray_address, field="--ray-address")
    else:
        init_args["num_cpus"] = os.cpu_count() or 2
    return {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }


def run_server_app(
    layout: RunLayout,
    main: Any,
    *,
    transport: Transport = Transport.FLOWER,
    num_cpus_per_client: float = 1.0,
    verbose: bool = False,
    ray_address: str = "",
) -> None:
    """Run ``main(grid)`` as the ServerApp of a simulation of ``layout``'s merchants, on a
    local Ray or, with ``ray_address``, on that running Ray cluster."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from client.app import app as client_app

    merchants = len(layout.merchant_ids())
    if transport is Transport.IN_PROCESS:
        if ray_address:
            raise ConfigError("a Ray address needs Flower's simulation engine, not in-process")
        from simulations.inprocess import simulation_grid

        main(simulation_grid(client_app, merchants))
        return
    from flwr.simulation import run_simulation

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid)

    quiet_flower(verbose=verbose)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=merchants,
        backend_config=backend_config(
            num_cpus_per_client=num_cpus_per_client, verbose=verbose, ray_address=ray_address
        ),
    )


def simulate(
    layout: RunLayout,
    *,
    stop_after_round: int | None = None,
    num_cpus_per_client: float = 1.0,
    transport: Transport = Transport.FLOWER,
    verbose: bool = False,
    ray_address: str | None = None,
) -> PlatformResult:
    """Run (or resume) the federation of ``layout``; returns the platform's result.
    ``ray_address`` (default: the run configuration's ``simulation.ray_address``) attaches
    the simulation to a running Ray cluster."""
    from server.checkpoint import load_latest
    from server.platform import run_platform

    settings = server_settings(layout, stop_after_round=stop_after_round)
    latest = load_latest(settings.checkpoints)
    first_round = 1 if latest is None else latest.round + 1
    results: list[PlatformResult] = []

    def main(grid: Any) -> None:
        rounds = settings.config.federation.rounds
        with watched(grid, rounds=rounds, first_round=first_round) as shown:
            results.append(run_platform(shown, settings))

    run_server_app(
        layout,
        main,
        transport=transport,
        num_cpus_per_client=num_cpus_per_client,
        verbose=verbose,
        ray_address=settings.config.simulation.ray_address if ray_address is None else ray_address,
    )
    if not results:
        raise TrainingError(f"the simulation ended without a result in {layout.root}; see the log")
    result = results[0]
    if result.completed and result.summary.get("aggregated_rounds", 0) == 0:
        raise TrainingError(
            f"no round had enough usable merchant updates; the model was never trained "
            f"(reasons per round in {layout.root / 'metrics.json'})"
        )
    return result


def resume_layout(root: Path) -> RunLayout:
    layout = RunLayout(root.resolve())
    if not layout.config.exists():
        raise CheckpointError(f"{root} is not a fedshop run directory (no config.toml)")
    return layout
