"""What the ``fedshop`` command prints: fedshop's own messages by default, everything with -v.

Quiet (the default) keeps fedshop's INFO lines and every library's warnings and errors, and
drops what only a developer reads: Flower's and Ray's DEBUG lines, deprecation notices
(Flower logs its own as warnings), and the output of Ray's actor processes (a merchant's
failure still reaches the log through the platform's round report). ``-v`` shows all of it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARY_LOGGERS = ("flwr", "ray", "alembic", "filelock", "urllib3", "matplotlib", "opacus")
DEPRECATION_MARKERS = ("DEPRECATED", "deprecated")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time, so that a progress display that
    redirects it keeps log lines above its bars."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _NoDeprecations(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(marker in str(record.msg) for marker in DEPRECATION_MARKERS)


def configure_output(*, verbose: bool) -> None:
    """Set up logging and warnings for one ``fedshop`` process."""
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if verbose:
        warnings.simplefilter("default")
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def quiet_flower(*, verbose: bool) -> None:
    """Route Flower's log through fedshop's one handler (Flower adds its own coloured console
    handler on import, which would print every line twice) and, unless ``verbose``, drop its
    DEBUG lines and deprecation notices. Call before Flower starts."""
    from flwr.common.logger import ConsoleHandler

    flower = logging.getLogger("flwr")
    for handler in list(flower.handlers):
        if isinstance(handler, ConsoleHandler):
            flower.removeHandler(handler)
    flower.propagate = True
    flower.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for old in [f for f in flower.filters if isinstance(f, _NoDeprecations)]:
        flower.removeFilter(old)
    if not verbose:
        flower.addFilter(_NoDeprecations())


def ray_init_args(*, verbose: bool) -> dict[str, Any]:
    """Ray start-up options: its own log level, and whether actors' output reaches us."""
    return {
        "logging_level": logging.DEBUG if verbose else logging.WARNING,
        "log_to_driver": verbose,
        "include_dashboard": False,
    }
