"""``flower-supernode`` with shorter fixed waits in its main loop.

Flower 1.41's SuperNode sleeps a fixed 3 s after every ask that brings no message, and checks
every 0.5 s whether the ClientApp's reply is ready (``supernode/start_client_internal.py``).
A message that arrives at the platform waits up to 3 s before a merchant picks it up, and a
round that follows another at once waits the full 3 s: docs/transport.md measured 3.8 s per
message with fedshop's runner, of which 3 s was this wait. This entry point runs Flower's own
``flower-supernode`` unchanged except for those waits:

* asking for work when idle: right after a reply went back the next message often follows
  within a second (the platform's next round, or its next question), so the SuperNode asks
  again after :data:`AFTER_REPLY_POLL_S`, then waits a quarter of the time it has been idle
  (:data:`IDLE_POLL_FRACTION`), up to ``--idle-poll S`` (default 1 s) from 4 s on. An idle
  merchant costs the platform one request per ``S`` seconds (Flower: one per 3 s), and each
  message about ten more in the 4 s after its reply (:func:`idle_wait`);
* checking whether the ClientApp's reply is ready: 0.5 s -> :data:`REPLY_POLL_S` (a local
  look at the SuperNode's own state, no request);
* asking again for parts of a message that have not reached the platform yet: after 50 ms
  instead of 1 s (common/flower_waits.py).

If the installed Flower no longer has these waits where this expects them, nothing is changed
and a warning says so.

Run as ``python -m simulations.deployment.supernode [--idle-poll S] FLOWER-SUPERNODE-ARGS``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from common.flower_waits import REMOTE_RETRIES, quicken_object_pulls

FLOWER_IDLE_WAIT_S = 3  # the literals in flwr/supernode/start_client_internal.py (1.41)
FLOWER_REPLY_WAIT_S = 0.5
REPLY_POLL_S = 0.05
AFTER_REPLY_POLL_S = 0.1
IDLE_POLL_FRACTION = 0.25
DEFAULT_IDLE_POLL_S = 1.0
log = logging.getLogger("fedshop.supernode")


def idle_wait(idle_s: float | None, idle_poll: float) -> float:
    """Seconds before the next ask for work, ``idle_s`` after the last reply went back (None:
    no reply yet)."""
    if idle_s is None:
        return idle_poll
    return min(idle_poll, max(AFTER_REPLY_POLL_S, IDLE_POLL_FRACTION * idle_s))


class _ShorterWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its two fixed waits
    are shortened (the idle one by :func:`idle_wait`), every other call goes to ``time``
    itself. :meth:`replied` wraps the loop's ``_push_messages`` to know when a reply went."""

    def __init__(self, idle_poll: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_poll = idle_poll
        self.clock = clock
        self.last_reply: float | None = None

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_WAIT_S:
            idle_s = None if self.last_reply is None else self.clock() - self.last_reply
            seconds = idle_wait(idle_s, self.idle_poll)
        elif seconds == FLOWER_REPLY_WAIT_S:
            seconds = REPLY_POLL_S
        time.sleep(seconds)

    def replied(self, push_messages: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(push_messages)
        def wrapped(*args: Any, **kwargs: Any) -> None:
            try:
                push_messages(*args, **kwargs)
            finally:
                self.last_reply = self.clock()

        return wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_idle_wait(
    loop: ModuleType, idle_poll: float, clock: Callable[[], float] = time.monotonic
) -> bool:
    """Patch ``loop`` (Flower's SuperNode main loop); False if it is not the expected code."""
    source = inspect.getsource(loop)
    expected = (
        f"time.sleep({FLOWER_IDLE_WAIT_S})",
        f"time.sleep({FLOWER_REPLY_WAIT_S})",
        "_push_messages(",
    )
    if not all(call in source for call in expected) or getattr(loop, "time", None) is not time:
        return False
    waits = _ShorterWaits(idle_poll, clock)
    loop._push_messages = waits.replied(loop._push_messages)  # type: ignore[attr-defined]
    loop.time = waits  # type: ignore[attr-defined]
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
    if not quicken_object_pulls(start_client_internal, REMOTE_RETRIES):
        logging.basicConfig()
        log.warning("this Flower pulls message parts differently; retries left unchanged")
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
