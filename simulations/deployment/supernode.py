"""``flower-supernode`` with shorter fixed waits in its main loop.

Flower 1.41's SuperNode sleeps a fixed 3 s after every ask that brings no message, and checks
every 0.5 s whether the ClientApp's reply is ready (``supernode/start_client_internal.py``).
A message that arrives at the platform waits up to 3 s before a merchant picks it up, and a
round that follows another at once waits the full 3 s: docs/transport.md measured 3.8 s per
message with fedshop's runner, of which 3 s was this wait. This entry point runs Flower's own
``flower-supernode`` unchanged except for those two waits: the idle one becomes
``--idle-poll S`` (default 1 s), the reply check 0.1 s. The price is more idle requests to
the platform: one per ``S`` seconds per merchant instead of one per 3 s (the reply check is
local).

If the installed Flower no longer has the 3 s wait where this expects it, nothing is changed
and a warning says so.

Run as ``python -m simulations.deployment.supernode [--idle-poll S] FLOWER-SUPERNODE-ARGS``.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from types import ModuleType
from typing import Any

FLOWER_IDLE_WAIT_S = 3  # the literals in flwr/supernode/start_client_internal.py (1.41)
FLOWER_REPLY_WAIT_S = 0.5
REPLY_POLL_S = 0.1
DEFAULT_IDLE_POLL_S = 1.0
log = logging.getLogger("fedshop.supernode")


class _ShorterWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its two fixed waits
    are shortened, every other call goes to ``time`` itself."""

    def __init__(self, idle_poll: float) -> None:
        self.waits = {FLOWER_IDLE_WAIT_S: idle_poll, FLOWER_REPLY_WAIT_S: REPLY_POLL_S}

    def sleep(self, seconds: float) -> None:
        time.sleep(self.waits.get(seconds, seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_idle_wait(loop: ModuleType, idle_poll: float) -> bool:
    """Patch ``loop`` (Flower's SuperNode main loop); False if it is not the expected code."""
    source = inspect.getsource(loop)
    expected = (f"time.sleep({FLOWER_IDLE_WAIT_S})", f"time.sleep({FLOWER_REPLY_WAIT_S})")
    if not all(call in source for call in expected) or getattr(loop, "time", None) is not time:
        return False
    loop.time = _ShorterWaits(idle_poll)  # type: ignore[attr-defined]
    return True


def split_args(argv: list[str]) -> tuple[float, list[str]]:
    """``--idle-poll S`` (ours) and the rest (Flower's)."""
    if argv[:1] != ["--idle-poll"]:
        return DEFAULT_IDLE_POLL_S, argv
    if len(argv) < 2:
        raise SystemExit("--idle-poll needs a number of seconds")
    seconds = float(argv[1])
    if not 0.1 <= seconds <= FLOWER_IDLE_WAIT_S:
        raise SystemExit(f"--idle-poll must be between 0.1 and {FLOWER_IDLE_WAIT_S} seconds")
    return seconds, argv[2:]


def main() -> None:
    idle_poll, flower_args = split_args(sys.argv[1:])
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if not shorten_idle_wait(start_client_internal, idle_poll):
        logging.basicConfig()
        log.warning("this Flower has not the fixed waits expected; left unchanged")
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
