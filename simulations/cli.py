"""The ``fedshop`` command: one entry point, one module per subcommand group.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)`` and sets a
``handler`` default on the parsers it adds. Errors from the fedshop hierarchy become one
line on stderr and the documented exit code (``common.errors.ExitCode``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from common.errors import ExitCode, FedshopError, exit_code_table
from common.flower_env import quiet_flower_environment

COMMAND_MODULES: tuple[str, ...] = (
    "simulations.commands.simulate",
    "simulations.commands.data",
    "simulations.commands.certs",
    "simulations.commands.deploy",
    "simulations.commands.model",
    "simulations.commands.keys",
    "simulations.commands.audit",
    "simulations.commands.canary",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedshop",
        description="Privacy-preserving federated learning for e-commerce merchants.",
        epilog=f"exit codes:\n{exit_code_table()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
