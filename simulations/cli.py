"""The ``fedshop`` command: one entry point, one module per subcommand group.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)`` and sets a
``handler`` default on the parsers it adds. Errors from the fedshop hierarchy become one
line on stderr and the documented exit code (``common.errors.ExitCode``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator, Sequence

from common.errors import ExitCode, FedshopError, exit_code_table
from common.flower_env import quiet_flower_environment
from simulations.console import configure_output

COMMAND_MODULES: tuple[str, ...] = (
    "simulations.commands.simulate",
    "simulations.commands.data",
    "simulations.commands.certs",
    "simulations.commands.deploy",
    "simulations.commands.merchant",
    "simulations.commands.model",
    "simulations.commands.keys",
    "simulations.commands.audit",
    "simulations.commands.serve",
)

VERBOSE = "also show debug logging, Flower's and Ray's output and library warnings"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedshop",
        description="Privacy-preserving federated learning for e-commerce merchants.",
        epilog=f"exit codes:\n{exit_code_table()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for _, command in commands(parser):
        if command is not parser:
            command.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE
            )
    return parser


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("fedshop",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the command tree with its path, the top level first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def main(argv: Sequence[str] | None = None) -> int:
    quiet_flower_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_output(verbose=args.verbose)
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
