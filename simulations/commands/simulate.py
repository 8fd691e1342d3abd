"""``fedshop simulate``: many merchants on one machine, on real retail data by default."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

from common.config import RunConfig
from common.configparse import apply_overrides, load_toml


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    parser = subparsers.add_parser(
        "simulate",
        help="run a federated DP training simulation",
        description="Provision merchants from Complete Journey (or synthetic data) and run "
        "offline federated rounds with per-merchant DP-SGD in Flower's simulation engine.",
    )
    parser.add_argument("--config", type=Path, help="run configuration TOML (defaults built in)")
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
        help="after the offline rounds, stream later weeks through the merchants' inboxes "
        "with gated fine-tuning (default: every week after the training weeks); writes "
        "online.csv and online.json",
    )
    parser.add_argument("--stop-after-round", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def load_config(path: Path | None, overrides: list[str]) -> RunConfig:
    data = load_toml(path) if path else {}
    return RunConfig.from_dict(apply_overrides(data, overrides))


def run(args: argparse.Namespace) -> int:
    from server.reporting import round_table
    from simulations.provision import provision
    from simulations.runner import resume_layout, simulate

    began = time.perf_counter()
    if args.resume:
        if args.config or args.overrides:
            from common.errors import ConfigError

            raise ConfigError(
                "--resume takes the configuration from the run directory; drop --config/--set"
            )
        layout = resume_layout(args.resume)
    else:
        config = load_config(args.config, args.overrides)
        out = args.out or Path("runs") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        print(f"fedshop: provisioning merchants in {out} ...", flush=True)
        layout = provision(config, out)
    if args.online is not None:
        return _run_online(args, layout, began)
    result = simulate(layout, stop_after_round=args.stop_after_round)
    summary = result.summary
    print("\n" + round_table(result.history))
    test = summary.get("test") or {}
    if test:
        print(
            f"\ntest weeks (federated evaluation, {summary.get('test_cases', 0):.0f} cases): "
            + "  ".join(f"{k} {v:.4f}" for k, v in sorted(test.items()))
        )
    state = "complete" if summary["completed"] else "stopped early (resume with --resume)"
    print(f"\nrun {summary['run_id']} {state} in {time.perf_counter() - began:.0f}s: {layout.root}")
    return 0


def _run_online(args: argparse.Namespace, layout: object, began: float) -> int:
    from common.errors import ConfigError
    from simulations.online import StreamSpec, simulate_online
    from simulations.provision import RunLayout

    assert isinstance(layout, RunLayout)
    if args.resume or args.stop_after_round is not None:
        raise ConfigError("--online starts a new run; it cannot be combined with --resume")
    spec = StreamSpec.parse(args.online, RunConfig.from_toml(layout.config))
    summary = simulate_online(layout, spec)
    means = "  ".join(
        f"mean {k[5:]} {v:.4f}" for k, v in sorted(summary.items()) if k.startswith("mean_")
    )
    print(
        f"\nonline weeks {spec.first_week}-{spec.last_week} (prequential, federated): {means}  "
        f"{summary['promotions']}/{summary['candidates']} candidates promoted, "
        f"{summary['rollbacks']} rollback(s)"
    )
    print(f"run complete in {time.perf_counter() - began:.0f}s: {layout.root / 'online.csv'}")
    return 0
