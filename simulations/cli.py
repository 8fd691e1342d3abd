"""The ``fedshop`` command: one entry point, one module per subcommand group.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)`` and sets a
``handler`` default on the parsers it adds. Errors from the fedshop hierarchy become one
line on stderr and the documented exit code (``common.errors.ExitCode``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from common.errors import ExitCode, FedshopError

COMMAND_MODULES: tuple[str, ...] = (
    "simulations.commands.simulate",
    "simulations.commands.data",
    "simulations.commands.certs",
    "simulations.commands.deploy",
    "simulations.commands.merchant",
    "simulations.commands.model",
    "simulations.commands.keys",
    "simulations.commands.audit",
    "simulations.commands.canary",
)

FLOWER_QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def quiet_flower_environment() -> None:
    """Keep Flower and Ray offline: no telemetry, no update check, no per-run installs."""
    for key, value in FLOWER_QUIET_ENV.items():
        os.environ.setdefault(key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedshop",
        description="Privacy-preserving federated learning for e-commerce merchants.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_flower_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "filelock", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = args.handler(args)
    except FedshopError as exc:
        print(f"fedshop: error: {exc.one_line()}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("fedshop: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
