"""``fedshop simulate``: many merchants on one machine, on real retail data by default."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import RunConfig
from common.configparse import apply_overrides, load_toml
from simulations.cli import check_output_directory

if TYPE_CHECKING:
    from simulations.online import StreamSpec
    from simulations.provision import RunLayout


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    parser = subparsers.add_parser(
        "simulate",
        help="run a federated DP training simulation",
        description="Provision merchants from Complete Journey, synthetic data or your own "
        "event files (--data) and run offline federated rounds with per-merchant DP-SGD in "
        "Flower's simulation engine; optionally stream the held-out time afterwards (--online).",
    )
    parser.add_argument("--config", type=Path, help="run configuration TOML (defaults built in)")
    parser.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="your own merchants: a CSV/Parquet file with a merchant_id column, or a folder "
        "of one file per merchant named after it (checked like `fedshop data import`)",
    )
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="SRC=FIELD",
        help="with --data: rename a source column to a schema field (FIELD '-' drops it)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration value, e.g. --set federation.rounds=3",
    )
    parser.add_argument("--out", type=Path, help="run directory (default runs/<UTC time>)")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint",
    )
    parser.add_argument(
        "--online",
        nargs="?",
        const="",
        default=None,
        metavar="FIRST-LAST",
        help="after the offline rounds, stream slices of the held-out time (weeks by "
        "default, data.slice_days) through the merchants' inboxes with gated fine-tuning "
        "(default: every slice after training); writes online.csv and online.json",
    )
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the merchants' ClientApps on this running Ray cluster (its head node, as "
        "printed by `ray start --head`) instead of a local Ray; the run directory must be at "
        "the same path on every node (docs/deployment.md). Overrides simulation.ray_address",
    )
    parser.add_argument(
        "--stop-after-round",
        type=int,
        metavar="N",
        help="stop after round N (checkpointed); continue later with --resume",
    )
    parser.set_defaults(handler=run)


def load_config(
    path: Path | None,
    overrides: list[str],
    *,
    data: Path | None = None,
    maps: Sequence[str] = (),
) -> RunConfig:
    """The configuration file, then ``--data``/``--map``, then ``--set``."""
    from common.errors import ConfigError

    if maps and data is None:
        raise ConfigError("--map renames columns of --data files; give --data PATH")
    settings = load_toml(path) if path else {}
    if data is not None:
        own = {"source": "files", "path": str(data.resolve()), "mapping": list(maps)}
        settings = {**settings, "data": {**settings.get("data", {}), **own}}
    return RunConfig.from_dict(apply_overrides(settings, overrides))


def run(args: argparse.Namespace) -> int:
    from simulations.runner import resume_layout

    began = time.perf_counter()
    if args.ray_address:
        from common.config import check_ray_address

        check_ray_address(args.ray_address, field="--ray-address")
    if args.resume:
        if args.config or args.overrides or args.data or args.map or args.online is not None:
            from common.errors import ConfigError

            raise ConfigError(
                "--resume takes the configuration and data from the run directory; "
                "drop --config/--set/--data/--map/--online"
            )
        return _run_offline(args, resume_layout(args.resume), began)
    if args.out is not None:
        check_output_directory(args.out, "--out")
    config = load_config(args.config, args.overrides, data=args.data, maps=args.map)
    requested = None if args.online is None else _check_online_flags(args)
    layout, stream = _provision(
        config, args.out, online=args.online is not None, requested=requested
    )
    if stream is not None:
        return _run_online(layout, stream, began, verbose=args.verbose, ray=args.ray_address)
    return _run_offline(args, layout, began)


def _check_online_flags(args: argparse.Namespace) -> tuple[int, int] | None:
    from common.errors import ConfigError
    from common.split import parse_slice_range

    if args.stop_after_round is not None:
        raise ConfigError("--online runs the offline rounds to the end; drop --stop-after-round")
    return parse_slice_range(args.online)


def _provision(
    config: RunConfig, out: Path | None, *, online: bool, requested: tuple[int, int] | None
) -> tuple[RunLayout, StreamSpec | None]:
    """Load and check everything, then lay out the run; nothing is written on a bad input."""
    from common.datasets import load_dataset
    from common.events import TIMESTAMP
    from common.split import stream_range
    from simulations.provision import provision

    dataset = load_dataset(config)
    stream = None
    if online:
        from simulations.online import StreamSpec

        last_event = dataset.events[TIMESTAMP].max()
        stream = StreamSpec(*stream_range(dataset.split, requested, last_event=last_event))
    out = out or Path("runs") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    layout = provision(config, out, dataset=dataset)
    print(f"split: {dataset.split.describe()}", flush=True)
    return layout, stream


def _run_offline(args: argparse.Namespace, layout: RunLayout, began: float) -> int:
    from server.reporting import merchant_table, round_table
    from simulations.runner import simulate

    result = simulate(
        layout,
        stop_after_round=args.stop_after_round,
        verbose=args.verbose,
        ray_address=args.ray_address,
    )
    summary = result.summary
    print("\n" + round_table(result.history))
    table = merchant_table(summary)
    if table:
        print("\n" + table)
    state = "complete" if summary["completed"] else "stopped early (resume with --resume)"
    print(f"\nrun {summary['run_id']} {state} in {time.perf_counter() - began:.0f}s: {layout.root}")
    return 0


def _run_online(
    layout: RunLayout, spec: StreamSpec, began: float, *, verbose: bool, ray: str | None
) -> int:
    from simulations.online import simulate_online

    summary = simulate_online(layout, spec, verbose=verbose, ray_address=ray)
    means = "  ".join(
        f"mean {k[5:]} {v:.4f}" for k, v in sorted(summary.items()) if k.startswith("mean_")
    )
    print(
        f"\nonline slices {spec.first_week}-{spec.last_week} (prequential, federated): {means}  "
        f"{summary['promotions']}/{summary['candidates']} candidates promoted, "
        f"{summary['rollbacks']} rollback(s)"
    )
    print(f"run complete in {time.perf_counter() - began:.0f}s: {layout.root / 'online.csv'}")
    return 0
