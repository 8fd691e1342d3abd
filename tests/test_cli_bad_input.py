"""Bad input reaches the user as one line with the documented exit code, never a traceback.

Each case goes through ``simulations.cli.main`` as a user would: a file where a directory is
expected (or the reverse), a file that is not TOML, a damaged checkpoint, a value out of
range. The message must name the file or flag and say what was expected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.config import RunConfig, dump_toml
from common.configparse import apply_overrides, load_toml
from common.errors import CheckpointError, ConfigError, ExitCode
from server.checkpoint import Checkpoint, load_latest, save_checkpoint
from simulations import cli


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The exit code and the one line on stderr (asserted to be exactly one)."""
    code = cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("fedshop: error: "), lines
    return code, lines[0]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.csv"
    path.write_text("merchant_id,customer_id\n")
    return path


# -- configuration files ------------------------------------------------------------------


def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_bytes(b"seed = 1\n\xff\n")
    return path


def _directory(tmp_path: Path) -> Path:
    (tmp_path / "cfg").mkdir()
    return tmp_path / "cfg"


def _parquet(tmp_path: Path) -> Path:
    path = tmp_path / "events.parquet"
    path.write_bytes(b"PAR1\x15\x04\x15\x80\x01\x15\x80\x01L\x15\x02\x15\x00\x00\x00PAR1")
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_not_utf8, "is not UTF-8 text (byte 0xff at offset 9); expected a TOML file"),
        (_directory, "is a directory; expected a TOML file"),
        (_parquet, "expected a TOML file"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ["simulate"],
        ["audit", "canary"],
        ["recommend", "--customer", "c1"],
        ["server", "--state", "STATE", "--insecure-dev", "--run-dir", "R", "--keys-dir", "K"],
    ],
)
def test_a_config_that_is_not_a_toml_file_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, expected: str, command: list[str]
) -> None:
    path = make(tmp_path)
    argv = [str(tmp_path / a) if a in ("STATE", "R", "K") else a for a in command]
    code, line = run([*argv, "--config", str(path)], capsys)
    assert code == ExitCode.CONFIG
    assert str(path) in line and expected in line


def test_load_toml_names_a_file_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x\.toml does not exist"):
        load_toml(tmp_path / "x.toml")
    (tmp_path / "bad.toml").write_text("seed = = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML: .*line 1"):
        load_toml(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[privacy]\nepsilon_cap = "3"\n', r"privacy\.epsilon_cap: expected a TOML number"),
        ('[federation]\nrounds = "3"\n', r"federation\.rounds: expected a TOML integer"),
        ('[privacy]\nenabled = "yes"\n', r"privacy\.enabled: expected a TOML boolean"),
        ('[training]\nlearning_rate = "0.1"\n', r"training\.learning_rate: expected a TOML num"),
        ('[data]\ntrain_weeks = "1,40"\n', r"data\.train_weeks: expected a TOML array"),
        ('[data]\ntrain_weeks = ["1", "40"]\n', r"data\.train_weeks: expected a TOML integer"),
    ],
)
def test_a_quoted_number_or_boolean_in_a_toml_file_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as refused:
        RunConfig.from_toml(path)
    assert str(refused.value).startswith(f"{path}: ")


def test_toml_numbers_and_booleans_and_strings_still_load(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        '[privacy]\nepsilon_cap = 3\nenabled = true\nunit = "customer"\n'
        "[data]\ntrain_weeks = [2, 30]\nvalid_weeks = [31, 35]\ntest_weeks = [36, 40]\n"
    )
    config = RunConfig.from_toml(path)
    assert config.privacy.epsilon_cap == 3.0 and config.privacy.enabled is True
    assert config.privacy.unit.value == "customer" and config.data.train_weeks == (2, 30)
    assert type(config.privacy.unit.value) is str and type(config.data.path) is str
    path.write_text(dump_toml(config.to_dict()))
    assert RunConfig.from_toml(path) == config


def test_set_on_the_command_line_still_parses_text_over_a_toml_file(tmp_path: Path) -> None:
    """``--set`` values are text by nature: they are parsed, also over a file's values."""
    path = tmp_path / "run.toml"
    path.write_text("[privacy]\nepsilon_cap = 2\n")
    settings = apply_overrides(
        load_toml(path),
        ["privacy.epsilon_cap=3", "privacy.enabled=yes", "data.train_weeks=2,30", "seed=7"],
    )
    config = RunConfig.from_dict(
        apply_overrides(settings, ["data.valid_weeks=31,35", "data.test_weeks=36,40"])
    )
    assert config.privacy.epsilon_cap == 3.0 and config.privacy.enabled is True
    assert config.data.train_weeks == (2, 30) and config.seed == 7


def _merchant_toml(path: Path, body: str) -> Path:
    path.write_text(f'[merchant]\nid = "m1"\nstate_dir = "s"\nsigning_key = "k"\n{body}')
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", r"missing required key 'merchant\.data'"),
        ('data = "d"\nallow_non_private = "yes"\n', "allow_non_private: expected a TOML boolean"),
        ('data = "d"\nepsilon_cap = "3"\n', "epsilon_cap: expected a TOML number"),
    ],
)
def test_merchant_toml_errors_name_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, message: str
) -> None:
    path = _merchant_toml(tmp_path / "merchant.toml", body)
    code, line = run(["recommend", "--config", str(path), "--customer", "c1"], capsys)
    assert code == ExitCode.CONFIG
    assert f"error: {path}: " in line
    assert re.search(message, line), line


def test_server_config_with_a_bad_value_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[federation]\nrounds = 'two'\n")
    argv = ["server", "--state", str(tmp_path / "state"), "--insecure-dev", "--config", str(path)]
    argv += ["--run-dir", str(tmp_path / "r"), "--keys-dir", str(tmp_path / "k")]
    code, line = run(argv, capsys)
    assert code == ExitCode.CONFIG
    assert str(path) in line and "federation.rounds" in line
    assert not (tmp_path / "state").exists()


# -- output paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "expected"),
    [
        (["simulate", "--set", "data.source=synthetic", "--out", "{f}"], 3, "is a file"),
        (["simulate", "--set", "data.source=synthetic", "--out", "{f}/run"], 3, "is a file"),
        (["keys", "generate", "--out", "{f}", "--name", "m2"], 3, "is a file"),
        (["certs", "init", "--out", "{f}"], 9, "is a file"),
        (["certs", "issue-node", "--out", "{f}", "--name", "m1"], 9, "is a file"),
        (["merchant", "init", "--id", "m1", "--events", "{f}", "--out", "{f}/s2"], 3, "is a file"),
        (["data", "import", "{f}", "--out", "{f}/x.parquet"], 3, "is a file"),
    ],
)
def test_an_output_directory_blocked_by_a_file_is_named(
    a_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, expected: str
) -> None:
    filled = [arg.replace("{f}", str(a_file)) for arg in argv]
    before = sorted(a_file.parent.iterdir())
    got, line = run(filled, capsys)
    assert got == code
    out = filled[filled.index("--out") + 1]
    assert f"--out {out} " in line and f"{a_file} {expected}" in line
    assert sorted(a_file.parent.iterdir()) == before  # nothing written


def test_data_import_onto_a_directory_is_named(
    a_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d.parquet").mkdir()
    code, line = run(["data", "import", str(a_file), "--out", str(tmp_path / "d.parquet")], capsys)
    assert code == ExitCode.CONFIG
    assert "d.parquet is a directory; expected a file path" in line


# -- values out of range ---------------------------------------------------------------------


def test_max_mb_must_be_finite(a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run(["data", "validate", str(a_file), "--max-mb", "inf"], capsys)
    assert code == ExitCode.CONFIG and "--max-mb must be a finite number > 0, got inf" in line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--days", "99999999"], "--days 99999999: the certificate would be valid past 9999-12-31"),
        (["--common-name", ""], "--common-name '' is 0 bytes; expected 1-64 bytes"),
        (["--common-name", "x" * 65], "is 65 bytes; expected 1-64 bytes"),
    ],
)
def test_certs_init_refuses_values_x509_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    code, line = run(["certs", "init", "--out", str(tmp_path / "ca"), *extra], capsys)
    assert code == ExitCode.DEPLOYMENT and expected in line
    assert not (tmp_path / "ca").exists()


def test_certs_verify_names_a_directory_given_as_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ca").mkdir()
    argv = ["certs", "verify", "--ca-cert", str(tmp_path / "ca"), "--host", "localhost"]
    code, line = run([*argv, "--cert", str(tmp_path / "ca")], capsys)
    assert code == ExitCode.DEPLOYMENT
    assert f"certificate {tmp_path / 'ca'} is a directory; expected a PEM file" in line


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--config", "merchant.toml"],
        ["server", "--state", "state", "--insecure-dev"],
        ["client", "--insecure-dev"],
    ],
)
def test_a_port_out_of_range_is_refused_while_parsing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], port: str, command: list[str]
) -> None:
    flag = "--runtime-port" if command[0] == "client" else "--port"
    code, line = run([*command, flag, port], capsys)
    assert code == ExitCode.CONFIG
    assert f"{flag} {port} is not a TCP port; expected 0-65535" in line


# -- checkpoints -----------------------------------------------------------------------------


def _saved(directory: Path) -> Path:
    save_checkpoint(directory, Checkpoint(1, "run", "cfg", {}, {}, []))
    return directory / "round-0001.json"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / "latest.json").write_text("[]"), r"latest\.json holds a JSON list"),
        (lambda d: (d / "latest.json").write_text("{"), r"latest\.json is not JSON"),
        (lambda d: (d / "latest.json").write_text("{}"), "field 'checkpoint' is missing"),
        (
            lambda d: (d / "latest.json").write_text('{"checkpoint": "../x.json"}'),
            "field 'checkpoint' is '../x.json'; expected a file name",
        ),
        (lambda d: _drop(d, "archive_sha256"), "field 'archive_sha256' is missing; expected a SHA"),
        (lambda d: _drop(d, "history"), "field 'history' is missing"),
        (lambda d: _set(d, "round", "1"), "field 'round' is '1'; expected a round number"),
        (lambda d: (d / "round-0001.npz").unlink(), r"round-0001\.npz cannot be read"),
    ],
)
def test_a_damaged_checkpoint_names_the_file_and_field(
    tmp_path: Path, damage, expected: str
) -> None:
    _saved(tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=expected):
        load_latest(tmp_path)


def _drop(directory: Path, field: str) -> None:
    manifest = directory / "round-0001.json"
    data = json.loads(manifest.read_text())
    del data[field]
    manifest.write_text(json.dumps(data))


def _set(directory: Path, field: str, value: object) -> None:
    manifest = directory / "round-0001.json"
    data = json.loads(manifest.read_text())
    data[field] = value
    manifest.write_text(json.dumps(data))


def test_resume_with_a_damaged_checkpoint_exits_with_the_checkpoint_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.toml").write_text(dump_toml(RunConfig().to_dict()))
    (run_dir / "checkpoints" / "latest.json").write_text("[]")
    code, line = run(["simulate", "--resume", str(run_dir)], capsys)
    assert code == ExitCode.CHECKPOINT
    assert "checkpoints/latest.json holds a JSON list; expected a JSON object" in line
    _saved(run_dir / "checkpoints")
    _drop(run_dir / "checkpoints", "archive_sha256")
    code, line = run(["simulate", "--resume", str(run_dir)], capsys)
    assert code == ExitCode.CHECKPOINT
    assert "round-0001.json: field 'archive_sha256' is missing" in line


# -- the last resort -------------------------------------------------------------------------


def test_an_unexplained_os_error_is_one_line_naming_the_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulations.commands import keys

    def refuse(_args: object) -> int:
        raise PermissionError(13, "Permission denied", "/srv/keys/m1.pub")

    monkeypatch.setattr(keys, "_show", refuse)
    code, line = run(["keys", "show", "m1.pub"], capsys)
    assert code == ExitCode.CONFIG
    assert line == "fedshop: error: /srv/keys/m1.pub: Permission denied"


def test_fedshop_errors_keep_their_own_code_under_the_os_error_net(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulations.commands import keys

    def fail(_args: object) -> int:
        raise CheckpointError("run/checkpoints is gone")

    monkeypatch.setattr(keys, "_show", fail)
    code, line = run(["keys", "show", "m1.pub"], capsys)
    assert code == ExitCode.CHECKPOINT and "run/checkpoints is gone" in line
