"""Quiet by default, everything with -v; progress bars only in a terminal."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console
from rich.progress import Progress

from simulations.console import configure_output, quiet_flower, ray_init_args
from simulations.progress import RoundProgress, progress_display, tracked


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_output changes process-wide logging and warnings: put them back."""
    root = logging.getLogger()
    names = ["flwr", "ray", "py.warnings"]
    saved = (
        list(root.handlers),
        root.level,
        {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names},
        list(logging.getLogger("flwr").handlers),
        logging.getLogger("flwr").propagate,
    )
    with warnings.catch_warnings():
        yield
    logging.captureWarnings(False)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, (level, filters) in saved[2].items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).filters[:] = filters
    logging.getLogger("flwr").handlers[:] = saved[3]
    logging.getLogger("flwr").propagate = saved[4]


def emit_everything() -> None:
    flower = logging.getLogger("flwr")
    flower.debug("Pre-registering run with id 42")
    flower.warning("DEPRECATED FEATURE: The `run_simulation` function is deprecated")
    flower.warning("node 7 did not reply")
    logging.getLogger("ray").info("Started a local Ray instance.")
    logging.getLogger("server.federation").info("round 1/2: 3 trained")
    warnings.warn("old API", DeprecationWarning, stacklevel=1)
    warnings.warn("accelerator env var", FutureWarning, stacklevel=1)


@pytest.mark.usefixtures("restored_logging")
def test_quiet_output_keeps_fedshop_lines_and_real_warnings_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_output(verbose=False)
    quiet_flower(verbose=False)
    emit_everything()
    err = capsys.readouterr().err
    assert "round 1/2: 3 trained" in err
    assert err.count("node 7 did not reply") == 1  # Flower's own handler no longer doubles it
    for noise in ("Pre-registering", "DEPRECATED", "Ray instance", "old API", "accelerator"):
        assert noise not in err


@pytest.mark.usefixtures("restored_logging")
def test_verbose_output_shows_everything(capsys: pytest.CaptureFixture[str]) -> None:
    configure_output(verbose=True)
    quiet_flower(verbose=True)
    emit_everything()
    err = capsys.readouterr().err
    for line in ("Pre-registering", "DEPRECATED", "Ray instance", "old API", "accelerator"):
        assert line in err


def test_ray_is_told_to_keep_actor_output_unless_verbose() -> None:
    assert ray_init_args(verbose=False)["log_to_driver"] is False
    assert ray_init_args(verbose=False)["logging_level"] == logging.WARNING
    assert ray_init_args(verbose=True)["log_to_driver"] is True


def message(round_number: int | None, kind: str = "train") -> Any:
    config = {} if round_number is None else {"round": round_number}
    return SimpleNamespace(content={"config": config}, metadata=SimpleNamespace(message_type=kind))


def shown(display: Progress) -> dict[str, tuple[float, float | None]]:
    return {t.description: (t.completed, t.total) for t in display.tasks}


def test_round_progress_follows_messages() -> None:
    display = Progress(console=Console(file=io.StringIO(), force_terminal=True))
    progress = RoundProgress(display, rounds=3, first_round=2)  # resumed after round 1
    assert shown(display) == {"rounds": (1, 3)}
    progress.sent([message(2)] * 4)
    progress.received(3)
    assert shown(display) == {"rounds": (1, 3), "round 2 train": (3, 4)}
    progress.received(1)  # every merchant answered: the round is done
    assert shown(display)["rounds"] == (2, 3)
    progress.sent([message(3)] * 4)
    progress.received(2)  # two never answer; the next push or the end closes the round
    progress.close()
    assert shown(display) == {"rounds": (3, 3), "round 3 train": (2, 4)}


def test_a_round_pushed_in_batches_is_one_round() -> None:
    display = Progress(console=Console(file=io.StringIO(), force_terminal=True))
    progress = RoundProgress(display, rounds=2)
    progress.sent([message(1)] * 2, expected=5)
    progress.received(2)
    assert shown(display) == {"rounds": (0, 2), "round 1 train": (2, 5)}
    progress.sent([message(1)] * 3, expected=5)
    progress.received(3)
    assert shown(display) == {"rounds": (1, 2), "round 1 train": (5, 5)}
    progress.sent([message(1, "evaluate")] * 5, expected=5)
    assert shown(display)["round 1 evaluate"] == (0, 5)


def test_no_bars_when_output_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert progress_display().disable  # pytest captures stderr: not a terminal
    assert list(tracked(["a", "b"], "ledgers")) == ["a", "b"]
    assert capsys.readouterr().err == ""
