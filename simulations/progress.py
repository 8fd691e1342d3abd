"""Progress bars for long work, shown only when standard error is a terminal.

``RoundProgress`` follows the platform's messages (:mod:`simulations.watched_grid` wraps
Flower's Grid, so the platform code needs no hook): one bar for the rounds, one for the
merchants answering the current round. Redirected output (CI, ``make run > log``) gets no
bars, only the log lines.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from common import protocol as P

if TYPE_CHECKING:
    from flwr.app import Message

T = TypeVar("T")


def progress_display(*, enabled: bool | None = None) -> Progress:
    """A rich progress display on standard error; off unless it is a terminal."""
    console = Console(stderr=True)
    show = console.is_terminal if enabled is None else enabled
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
        transient=False,
    )


def tracked(items: Sequence[T], description: str, *, enabled: bool | None = None) -> Iterator[T]:
    """``items`` one by one, with a bar (e.g. merchants' ledgers in an audit)."""
    with progress_display(enabled=enabled) as display:
        task = display.add_task(description, total=len(items))
        for item in items:
            yield item
            display.advance(task)


class RoundProgress:
    """Rounds done of ``rounds``, and merchants that answered the round in flight."""

    def __init__(self, display: Progress, *, rounds: int, first_round: int = 1) -> None:
        self.display = display
        self.rounds: TaskID = display.add_task("rounds", total=rounds, completed=first_round - 1)
        self.merchants: TaskID | None = None
        self.in_flight: int | None = None
        self.asked = self.answered = self.pushed = 0
        self._key: tuple[str, int | None] | None = None

    def sent(self, messages: Sequence[Message], *, expected: int = 0) -> None:
        """A batch of messages went out; the platform pushes a round's messages in batches,
        so a batch of the same kind and round adds to the round in flight. ``expected``: how
        many the round will send (the connected nodes), when known."""
        if not messages:
            return
        kind = messages[0].metadata.message_type
        key = (kind, _round_of(messages[0]))
        if key != self._key:
            self._finish_round()
            self._key, self.in_flight = key, key[1]
            self.asked, self.answered, self.pushed = max(expected, len(messages)), 0, 0
            label = f"round {self.in_flight} {kind}" if self.in_flight else kind
            if self.merchants is None:
                self.merchants = self.display.add_task(label, total=self.asked)
            else:
                self.display.reset(self.merchants, total=self.asked, description=label)
        self.pushed += len(messages)
        if self.pushed > self.asked and self.merchants is not None:
            self.asked = self.pushed
            self.display.update(self.merchants, total=self.asked)

    def received(self, replies: int) -> None:
        if self.merchants is None or not replies:
            return
        self.display.advance(self.merchants, replies)
        self.answered += replies
        if self.answered >= self.asked:
            self._finish_round()

    def _finish_round(self) -> None:
        if self.in_flight is not None:
            self.display.update(self.rounds, completed=self.in_flight)
            self.in_flight = None

    def close(self) -> None:
        self._finish_round()


def _round_of(message: Message) -> int | None:
    try:
        return int(message.content[P.CONFIG][P.ROUND])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None
