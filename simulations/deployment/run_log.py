"""What ``fedshop server`` shows of a run: one line per round, problems, and a progress bar.

The ServerApp's whole log (``flwr log RUN --stream``) goes to ``STATE/logs/run-RUN.log``.
On the operator's terminal: the ServerApp's per-round summary line (merchants trained,
refused and failed, federated evaluation metrics, largest epsilon), warnings, errors and
tracebacks; everything with ``--verbose``. A progress bar over the rounds is drawn when
standard output is a terminal.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s?(.*)$")
_ROUND = re.compile(r"\bround (\d+)/(\d+): (.*)$")
QUIET_LEVELS = frozenset({"DEBUG", "INFO"})
# Lines the `flwr` CLI prints around a log stream, not the run's own news.
CLI_CHATTER = ("Using SuperLink:", "Successfully installed ")


@dataclass(frozen=True)
class LogLine:
    """One line of a run's log, without colours, split into level and message."""

    level: str | None
    message: str

    @classmethod
    def parse(cls, raw: str) -> LogLine:
        text = _ANSI.sub("", raw).rstrip("\n")
        match = _LEVEL.match(text.strip())
        if match is None:
            return cls(None, text)
        return cls(match.group(1), match.group(2).strip())


@dataclass(frozen=True)
class RoundLine:
    """The ServerApp's summary of a finished round (``round R/N: ...``)."""

    round: int
    rounds: int
    summary: str

    @classmethod
    def find(cls, message: str) -> RoundLine | None:
        match = _ROUND.search(message)
        if match is None:
            return None
        return cls(int(match.group(1)), int(match.group(2)), match.group(3).strip())

    def render(self) -> str:
        return f"round {self.round}/{self.rounds} | {self.summary}"


class RunLogView:
    """Copies every line to the run's log file and shows the operator what matters."""

    def __init__(
        self,
        log_file: Path,
        *,
        verbose: bool = False,
        out: IO[str] | None = None,
        progress: bool | None = None,
    ) -> None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log_file
        self._file = log_file.open("a", encoding="utf-8")
        self.verbose = verbose
        self.out = out or sys.stdout
        self.rounds_seen: dict[int, RoundLine] = {}
        use_bar = self.out.isatty() if progress is None else progress
        self._bar: Any = _ProgressBar(self.out) if use_bar else None

    def feed(self, raw: str) -> None:
        self._file.write(raw if raw.endswith("\n") else raw + "\n")
        self._file.flush()
        line = LogLine.parse(raw)
        found = RoundLine.find(line.message)
        if found is not None:
            self._round(found)
            return
        quiet = line.level in QUIET_LEVELS or line.message.startswith(CLI_CHATTER)
        if (self.verbose or not quiet) and line.message.strip():
            self._print(line.message if line.level is None else f"{line.level}: {line.message}")

    def _round(self, found: RoundLine) -> None:
        if found.round in self.rounds_seen:  # a restarted log stream replays the run's log
            return
        self.rounds_seen[found.round] = found
        self._print(found.render())
        if self._bar is not None:
            self._bar.update(found.round, found.rounds)

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.print(text)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._file.close()


class _ProgressBar:
    """A rich progress bar over the rounds, printed lines scrolling above it."""

    def __init__(self, out: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(file=out),
            transient=True,
        )
        self._task = self._progress.add_task("rounds", total=None)
        self._progress.start()

    def update(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)

    def print(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False)

    def stop(self) -> None:
        self._progress.stop()
