"""The ``fedshop`` command: one entry point, one module per subcommand group.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)`` and sets a
``handler`` default on the parsers it adds. Errors from the fedshop hierarchy become one
line on stderr and the documented exit code (``common.errors.ExitCode``); so does any other
operating-system error, as a last resort. The argument types and output-path checks that
several commands share live here too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from common.errors import ConfigError, ExitCode, FedshopError, exit_code_table
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
OS_ERROR_EXIT = ExitCode.CONFIG  # an OS error left unexplained is almost always a bad path


def tcp_port(flag: str) -> Callable[[str], int]:
    """An argparse ``type`` for a TCP port (0 picks a free one): a port out of range is a
    configuration error naming ``flag`` while the command line is parsed, before anything
    starts listening."""

    def port(text: str) -> int:
        number = int(text)  # not a number: argparse's own "invalid port value"
        if not 0 <= number <= 65535:
            raise ConfigError(f"{flag} {number} is not a TCP port; expected 0-65535 (0: any free)")
        return number

    return port


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_directory(
    path: Path, flag: str, *, error: type[FedshopError] = ConfigError
) -> None:
    """Refuse ``path`` unless it is a directory or can be created as one, so that a file in
    the way is named before any work is done rather than failing the final write."""
    blocker = _first_existing(Path(path))
    if blocker.exists() and not blocker.is_dir():
        if blocker == Path(path):
            raise error(f"{flag} {path} is a file; expected a directory (existing or new)")
        raise error(f"{flag} {path} cannot be created: {blocker} is a file, not a directory")


def check_output_file(path: Path, flag: str, *, error: type[FedshopError] = ConfigError) -> None:
    """Refuse ``path`` unless a file can be written there: not a directory, and no file
    where one of its parent directories should be."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{flag} {path} is a directory; expected a file path")
    blocker = _first_existing(path.parent)
    if blocker.exists() and not blocker.is_dir():
        raise error(f"{flag} {path} cannot be created: {blocker} is a file, not a directory")


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


def os_error_line(exc: OSError) -> str:
    """``<filename>: <strerror>`` (the OS's words), or the error's own text without a file."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {reason}"
    return f"{exc.filename}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    quiet_flower_environment()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # argument types may refuse a value (tcp_port)
        configure_output(verbose=args.verbose)
        code = args.handler(args)
    except FedshopError as exc:
        print(f"fedshop: error: {exc.one_line()}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("fedshop: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        raise  # the reader went away: not a bad input
    except OSError as exc:
        print(f"fedshop: error: {os_error_line(exc)}", file=sys.stderr)
        return int(OS_ERROR_EXIT)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
