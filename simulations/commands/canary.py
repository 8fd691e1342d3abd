"""``fedshop audit canary``: the one-run canary audit.

Trains the shared next-basket scorer with the merchants' DP trainer on real records plus
randomly included canaries and prints the empirical lower bound on epsilon next to the
accountant's claim (docs/canary.md). Torch and Opacus are imported inside the handler so that
``fedshop --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import AuditInconclusiveError, PrivacyViolationError
from simulations.cli import check_output_file

if TYPE_CHECKING:
    from simulations.canary import CanaryConfig, CanaryReport

DATA_CHOICES = ("synthetic", "completejourney")
SCORE_CHOICES = ("bias-shift", "margin")


def register_canary(audit_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``canary`` to the ``audit`` group."""
    _configure(audit_subparsers.add_parser("canary", help=_HELP, description=_DESCRIPTION))


_HELP = "empirical lower bound on epsilon from one training run with canaries"
_DESCRIPTION = (
    "Train the shared next-basket scorer with DP-SGD on real records plus randomly included "
    "canary baskets, guess which canaries were trained on, and report the epsilon those "
    "guesses prove (Steinke, Nasr, Jagielski 2023). Exit code 10 if the proven lower bound "
    "exceeds the claimed epsilon. Settings default to the run configuration (--config) or "
    "its defaults."
)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="run configuration TOML (model, records, privacy)"
    )
    parser.add_argument("--canaries", type=int, default=1000, help="canary records (default 1000)")
    parser.add_argument(
        "--guesses", type=int, help="guesses per side, fixed up front (default 2/5 of canaries)"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--epsilon",
        type=float,
        help="calibrate sigma to this epsilon (default: privacy.epsilon_cap)",
    )
    budget.add_argument(
        "--noise-multiplier", type=float, help="use this sigma instead of calibrating"
    )
    parser.add_argument("--clipping-norm", type=float, help="per-record clipping norm C")
    parser.add_argument("--delta", type=float, help="delta of the claim and of the bound")
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="confidence of the bound (default 0.95)"
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--batch-size", type=int, help="expected Poisson batch size")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate")
    parser.add_argument(
        "--score",
        choices=SCORE_CHOICES,
        default="bias-shift",
        help="bias-shift (white box: product biases, default) or margin (black box: scores)",
    )
    parser.add_argument("--data", choices=DATA_CHOICES, help="real records the canaries hide among")
    parser.add_argument("--seed", type=int, help="seed of every random stream")
    parser.add_argument(
        "--no-noise",
        action="store_true",
        help="negative control: train with noise off; the audit must then report a violation",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    parser.set_defaults(handler=_handle)


def _pick(flag: Any, default: Any) -> Any:
    return default if flag is None else flag


def config_from_args(args: argparse.Namespace) -> CanaryConfig:
    """Flags over the run configuration (``--config``, or the defaults) over the audit defaults."""
    from common.config import RunConfig
    from simulations.canary import CanaryConfig, CanaryData, CanaryScore

    run = RunConfig.from_toml(args.config) if args.config is not None else RunConfig()
    privacy = run.privacy
    fixed_sigma = args.noise_multiplier
    if args.epsilon is None and fixed_sigma is None:
        fixed_sigma = privacy.noise_multiplier
    epsilon = None if fixed_sigma is not None else _pick(args.epsilon, privacy.epsilon_cap)
    return CanaryConfig(
        canaries=args.canaries,
        guesses_per_side=args.guesses,
        target_epsilon=epsilon,
        noise_multiplier=fixed_sigma,
        clipping_norm=_pick(args.clipping_norm, privacy.clipping_norm),
        delta=_pick(args.delta, privacy.delta),
        confidence=args.confidence,
        noise_off=args.no_noise,
        score=CanaryScore(args.score),
        epochs=args.epochs,
        batch_size=_pick(args.batch_size, CanaryConfig.batch_size),
        # The audit trains with Adam (its validated setting), whatever the run's optimiser.
        learning_rate=_pick(args.learning_rate, 3e-3),
        data=CanaryData(_pick(args.data, run.data.source.value)),
        synthetic_events=run.data.synthetic_events_per_merchant,
        spec=run.model,
        records=run.records,
        seed=_pick(args.seed, run.seed),
    )


def format_report(report: CanaryReport) -> str:
    pct = f"{report.confidence:.0%}"
    rows = [
        (
            "data",
            f"{report.data}: {report.real_records} records + "
            f"{report.included} of {report.canaries} canaries",
        ),
        (
            "mechanism",
            f"sigma {report.noise_multiplier:.4g} (trained with {report.noise_used:.4g}), "
            f"C {report.clipping_norm:g}, q {report.sample_rate:.4g}, {report.steps} steps",
        ),
        ("score", report.score),
        ("claimed epsilon", f"{report.claimed_epsilon:.3f} (delta {report.delta:g}, RDP)"),
        (f"lower bound ({pct})", f"{report.epsilon_lower:.3f}"),
        (
            "guesses",
            f"{report.guesses} ({report.guessed_in} in, {report.guesses - report.guessed_in} out)",
        ),
        ("correct", f"{report.correct} ({report.correct / max(report.guesses, 1):.1%})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _handle(args: argparse.Namespace) -> int:
    from simulations.canary import run_canary_audit, write_report

    config = config_from_args(args)
    if args.json is not None:  # named now, not after the audit has run
        check_output_file(args.json, "--json")
    report = run_canary_audit(config)
    print(format_report(report))
    if args.json is not None:
        write_report(report, args.json)
    claim = f"{report.claimed_epsilon:.3f}"
    if config.noise_off:
        if not report.violation:
            raise AuditInconclusiveError(
                f"negative control NOT caught: lower bound {report.epsilon_lower:.3f} <= claimed "
                f"{claim}; the audit lacks power here (raise --epochs or --learning-rate)"
            )
        print(f"negative control caught: with noise off the bound exceeds the claim {claim}")
        return 0
    if report.violation:
        raise PrivacyViolationError(
            f"VIOLATION: the trained model provably leaks epsilon >= "
            f"{report.epsilon_lower:.3f} at {report.confidence:.0%} confidence, more than the "
            f"claimed {claim}"
        )
    print(
        f"no violation found: the bound does not exceed the claim {claim} "
        "(this does not prove the claim; docs/canary.md)"
    )
    return 0
