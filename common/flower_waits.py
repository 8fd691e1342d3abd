"""Flower's retry of a message part that has not arrived yet, made quicker, in one place.

A Flower message travels as a head (pushed first) and its parts (the records and arrays,
pushed one by one right after). Whoever pulls the head before every part is in asks again
for the missing parts with Flower's ``pull_objects``, which waits 1 s before the first
retry and backs off to 10 s (``flwr/supercore/constant.py``: ``PULL_INITIAL_BACKOFF``,
``PULL_BACKOFF_CAP``). That race is the normal case on three hops of every message:

* a merchant's SuperNode asks for work while the platform is still pushing the parts of
  the message it pulled;
* fedshop's ClientApp runner claims the task as soon as the SuperNode has the head, before
  the SuperNode has received the parts (simulations/deployment/runner.py);
* the platform pulls a reply whose parts the SuperNode is still pushing (server/exchange.py).

Each costs about one second per message (docs/transport.md measured it). Here the first
retry comes after :data:`FIRST_RETRY_S`, then the wait doubles:

* on the two loopback hops (runner to its SuperNode, platform to its SuperLink) up to
  :data:`LOOPBACK_MAX_RETRY_S`, for as long as Flower's ``PULL_MAX_TIME`` (2 h) or the
  caller's own limit allows: a retry there is a cheap local request;
* on the merchant's requests to the platform up to Flower's own 10 s, with Flower's limit on
  tries: a race costs the platform about four more small requests than before, and a part
  that never comes is given up after about as long as before.

Retries only happen while a message is in transit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType, ModuleType
from typing import Any

from flwr.supercore.inflatable import inflatable_utils

FIRST_RETRY_S = 0.05
LOOPBACK_MAX_RETRY_S = 0.5
# Keyword arguments of Flower's pull_objects / pull_and_inflate_object_from_tree.
LOOPBACK_RETRIES: Mapping[str, Any] = MappingProxyType(
    {
        "initial_backoff": FIRST_RETRY_S,
        "backoff_cap": LOOPBACK_MAX_RETRY_S,
        "max_tries_per_object": None,  # bounded by time (max_time) only
    }
)
REMOTE_RETRIES: Mapping[str, Any] = MappingProxyType({"initial_backoff": FIRST_RETRY_S})


def quick_pull_objects(retries: Mapping[str, Any]) -> Callable[..., dict[str, bytes]]:
    """Flower's ``pull_objects`` with ``retries`` as defaults; a caller's own values win."""
    flower_pull = inflatable_utils.pull_objects

    @functools.wraps(flower_pull)
    def pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        return flower_pull(*args, **{**retries, **kwargs})

    pull_objects.quick = True  # type: ignore[attr-defined]
    return pull_objects


def quicken_object_pulls(module: ModuleType, retries: Mapping[str, Any]) -> bool:
    """Make ``module`` (one of Flower's that imported ``pull_objects``) retry as ``retries``
    says.

    True if it was changed now; False if it already was, or if it holds no Flower
    ``pull_objects`` (another Flower version: then it is left as it is)."""
    current = getattr(module, "pull_objects", None)
    if current is None or getattr(current, "quick", False):
        return False
    if current is not inflatable_utils.pull_objects:
        return False
    module.pull_objects = quick_pull_objects(retries)  # type: ignore[attr-defined]
    return True
