"""Flower's Grid, watched: what the platform sends and receives moves a progress display."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from simulations.progress import RoundProgress, progress_display


class WatchedGrid(Grid):
    """A Grid that tells a :class:`RoundProgress` what it sends and receives."""

    def __init__(self, inner: Grid, progress: RoundProgress) -> None:
        self._inner = inner
        self._progress = progress

    def set_run(self, run: Any) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Any:
        return self._inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        ids = self._inner.push_messages(batch)
        self._progress.sent(batch, expected=len(list(self._inner.get_node_ids())))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._inner.pull_messages(message_ids))
        self._progress.received(len(replies))
        return replies

    def send_and_receive(self, messages: Iterable[Message], **kwargs: Any) -> Iterable[Message]:
        batch = list(messages)
        self._progress.sent(batch)
        replies = list(self._inner.send_and_receive(batch, **kwargs))
        self._progress.received(len(replies))
        return replies


@contextmanager
def watched(grid: Grid, *, rounds: int, first_round: int = 1) -> Iterator[Grid]:
    """``grid`` wrapped so that a terminal shows round and merchant progress."""
    with progress_display() as display:
        progress = RoundProgress(display, rounds=rounds, first_round=first_round)
        try:
            yield WatchedGrid(grid, progress)
        finally:
            progress.close()
