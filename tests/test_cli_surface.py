"""The command line as a user meets it: every command described, every flag explained, --help
working everywhere, one spelling per command, auditors told what was and was not verified."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from test_ledger_support import build_ledger

from common.errors import ExitCode
from simulations.cli import build_parser, commands, main

TREE = list(commands(build_parser()))
PATHS = [path for path, _ in TREE]


def test_every_command_has_a_description_and_every_flag_help() -> None:
    missing = []
    for path, parser in TREE:
        if not parser.description:
            missing.append(f"{' '.join(path)}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                name = "/".join(action.option_strings) or action.dest
                missing.append(f"{' '.join(path)}: {name} has no help")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_help_works_for_every_command(path: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([*path[1:], "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(path)}")
    assert "%%" not in out  # a description is not %-formatted: "%%" would print as is


def test_help_through_the_installed_entry_point_lists_each_command_once() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    top = {path[1] for path in PATHS if len(path) == 2}
    assert {"simulate", "data", "audit", "model", "keys", "certs", "server", "client"} <= top
    assert "audit-canary" not in result.stdout and "audit-canary" not in top
    assert ("fedshop", "audit", "canary") in PATHS


def test_verbose_is_accepted_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["-v", "keys", "show", "x.pub"]).verbose is True
    assert parser.parse_args(["keys", "show", "x.pub", "-v"]).verbose is True
    assert parser.parse_args(["keys", "show", "x.pub"]).verbose is False


@pytest.mark.parametrize("action", ["budgets", "recompute", "export"])
def test_audits_without_keys_need_an_explicit_no_signatures(
    action: str, tmp_path: Path, capsys
) -> None:
    build_ledger(tmp_path, "m1", 2)
    ledger = ["--ledger", str(tmp_path / "m1.sqlite")]
    assert main(["audit", action, *ledger]) == ExitCode.CONFIG
    assert "give --keys DIR" in capsys.readouterr().err
    unsigned = main(["audit", action, *ledger, "--no-signatures"])
    printed = capsys.readouterr()
    assert "NOT VERIFIED: signatures were not checked" in printed.err
    assert "give --keys DIR" not in printed.err
    if action != "export":  # the export's stdout is the data itself
        assert "NOT VERIFIED" in printed.out
    signed = main(["audit", action, *ledger, "--keys", str(tmp_path / "keys")])
    assert "NOT VERIFIED" not in capsys.readouterr().err
    assert unsigned == signed  # the keys change what is verified, not the verdict
    if action != "recompute":  # the fixture's epsilons are made up: recompute flags them
        assert signed == 0


def test_keys_and_no_signatures_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(
            ["audit", "budgets", "--ledger", "x", "--keys", "k", "--no-signatures"]
        )
    assert info.value.code == ExitCode.USAGE


def test_verify_and_report_have_no_unsigned_mode() -> None:
    for action in ("verify", "report"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["audit", action, "--ledger", "x", "--no-signatures"])
