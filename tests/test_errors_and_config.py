import ast
import sys
import types
from pathlib import Path

import pytest

from common.config import RunConfig, UpdateDtype, dump_toml
from common.configparse import apply_overrides
from common.errors import ConfigError, DataValidationError, ExitCode, FedshopError, exit_code_table
from simulations import cli
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _error_classes() -> list[type[FedshopError]]:
    """Every subclass of FedshopError, at any depth."""
    found: list[type[FedshopError]] = []
    pending = [FedshopError]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.append(sub)
            pending.append(sub)
    return found


def test_every_error_class_lives_in_common_errors():
    """The recursive walk sees every class only if none is defined elsewhere: checked on the
    source, so no module has to be imported for its classes to count."""
    known = {cls.__name__ for cls in [FedshopError, *_error_classes()]}
    elsewhere = []
    for package in ("common", "client", "server", "simulations"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "common" / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and any(
                    isinstance(base, ast.Name) and base.id in known for base in node.bases
                ):
                    elsewhere.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert elsewhere == []


def test_exit_codes_are_distinct_and_documented():
    classes = _error_classes()
    codes = [cls.exit_code for cls in classes]
    assert len(set(codes)) == len(codes), "two error classes share an exit code"
    general = {ExitCode.OK, ExitCode.INTERNAL, ExitCode.USAGE, ExitCode.INTERRUPTED}
    assert set(codes) == set(ExitCode) - general, "an exit code without its error class"
    for cls in classes:
        assert "exit_code" in vars(cls) and "hint" in vars(cls) and cls.hint.strip(), cls
        assert cls.__doc__ and cls.__doc__.strip(), cls
    assert all(code.meaning for code in ExitCode)


def _readme_exit_code_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_readme_exit_code_table_matches_the_enum():
    owner = {cls.exit_code: cls.__name__ for cls in _error_classes()}
    expected = [
        [
            str(code.value),
            f"`{code.name}`",
            code.meaning,
            f"`{owner[code]}`" if code in owner else "-",
        ]
        for code in ExitCode
    ]
    assert _readme_exit_code_rows() == expected


def test_help_prints_the_exit_code_table(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and exit_code_table() in out


@pytest.fixture
def failing_command(monkeypatch):
    """A ``fedshop explode`` command whose handler raises the error put in the returned list."""
    raised: list[BaseException] = []

    def register(subparsers):
        def handler(args):
            raise raised[0]

        subparsers.add_parser("explode").set_defaults(handler=handler)

    module = types.ModuleType("fedshop_test_explode")
    module.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, module.__name__))
    return raised


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_reaches_its_exit_code_and_one_line(cls, failing_command, capsys):
    failing_command.append(cls("something specific\nwent wrong"))
    assert cli.main(["explode"]) == cls.exit_code
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0] == f"fedshop: error: something specific went wrong ({cls.hint})"


def test_interrupt_exits_130(failing_command, capsys):
    failing_command.append(KeyboardInterrupt())
    assert cli.main(["explode"]) == ExitCode.INTERRUPTED == 130
    assert capsys.readouterr().err == "fedshop: interrupted\n"


def test_unexpected_exceptions_are_not_disguised(failing_command):
    """A bug keeps its traceback (Python exits 1, ExitCode.INTERNAL)."""
    failing_command.append(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["explode"])


def test_data_error_names_file_row_column():
    err = DataValidationError("expected a number", file="a.csv", row=3, column="price")
    assert "a.csv" in str(err) and "row 3" in str(err) and "'price'" in str(err)


def test_unknown_key_is_an_error_and_names_it():
    with pytest.raises(ConfigError, match=r"privacy\.epsilon_kap"):
        RunConfig.from_dict({"privacy": {"epsilon_kap": 3}})


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("privacy.epsilon_cap=0", "epsilon_cap"),
        ("privacy.delta=1", "delta"),
        ("federation.rounds=0", "rounds"),
        ("privacy.unit=household", "household"),
        ("training.batch_size=1.5", "integer"),
        ("data.train_weeks=1,45", "weeks"),
        ("model.embedding_dim=0", r"model\.embedding_dim must be >= 1"),
        ("model.product_buckets=1", r"model\.product_buckets must be >= 2"),
        ("federation.update_dtype=bfloat16", r"federation\.update_dtype: 'bfloat16' is not one"),
        ("privacy.epsilon_cap=1e300", r"privacy\.epsilon_cap must be in \(0, 100\], got 1e\+300"),
        ("privacy.noise_multiplier=1e-9", r"privacy\.noise_multiplier must be >= 0\.3"),
        ("privacy.noise_multiplier=0.29", r"privacy\.noise_multiplier must be >= 0\.3"),
        ("training.momentum=2.0", r"training\.momentum must be in \[0, 1\)"),
        ("training.momentum=-0.1", r"training\.momentum must be in \[0, 1\)"),
        ("federation.server_learning_rate=-0.01", r"federation\.server_learning_rate must be > 0"),
        ("federation.proximal_mu=-0.01", r"federation\.proximal_mu must be >= 0"),
        ("federation.max_update_norm=0", r"federation\.max_update_norm must be > 0"),
    ],
)
def test_bad_values_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_dict(apply_overrides({}, [override]))


def test_overrides_parse_types_and_hash_changes():
    base = RunConfig()
    tuned = RunConfig.from_dict(
        apply_overrides(
            {}, ["federation.rounds=3", "privacy.unit=customer", "federation.strategy=fedadam"]
        )
    )
    assert tuned.federation.rounds == 3 and tuned.privacy.unit.value == "customer"
    assert tuned.sha256() != base.sha256()
    assert RunConfig.from_dict(base.to_dict()) == base


def test_cli_maps_errors_to_exit_codes(capsys):
    code = main(["simulate", "--set", "privacy.epsilon_cap=-1", "--out", "/nonexistent/x"])
    assert code == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert (
        err.startswith("fedshop: error:")
        and "epsilon_cap" in err
        and len(err.strip().splitlines()) == 1
    )


def test_update_dtype_is_float32_unless_asked_and_the_default_keeps_config_hashes() -> None:
    """Configurations written before the option existed hash as they did: the default is not
    written out; float16 is, and changes what a signed release cites."""
    half = RunConfig.from_dict(apply_overrides({}, ["federation.update_dtype=float16"]))
    assert RunConfig().federation.update_dtype is UpdateDtype.FLOAT32
    assert half.federation.update_dtype is UpdateDtype.FLOAT16
    assert "update_dtype" not in RunConfig().to_dict()["federation"]
    assert half.to_dict()["federation"]["update_dtype"] == "float16"
    explicit = RunConfig.from_dict(apply_overrides({}, ["federation.update_dtype=float32"]))
    assert explicit == RunConfig() and explicit.sha256() == RunConfig().sha256()
    assert half.sha256() != RunConfig().sha256()
    assert RunConfig.from_dict(half.to_dict()) == half


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["federation.update_dtype=float16"],
        ["training.learning_rate=0.5", "privacy.noise_multiplier=1.25", "privacy.unit=customer"],
        ["data.train_weeks=2,30", "data.valid_weeks=31,35", "data.test_weeks=36,40", "seed=7"],
    ],
)
def test_dump_toml_reads_back_equal(tmp_path, overrides):
    config = RunConfig.from_dict(apply_overrides({}, overrides))
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(config.to_dict()), encoding="utf-8")
    assert RunConfig.from_toml(path) == config


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "head.example:10001", "[::1]:6379"])
def test_ray_address_is_host_and_port_and_not_part_of_the_config_hash(address: str) -> None:

    attached = RunConfig.from_dict({"simulation": {"ray_address": address}})
    assert attached.simulation.ray_address == address
    assert attached.sha256() == RunConfig().sha256()  # where it runs is not what is trained
    assert attached.to_dict()["simulation"] == {"ray_address": address}
    assert "simulation" not in RunConfig().to_dict()
    assert RunConfig.from_dict(attached.to_dict()) == attached


@pytest.mark.parametrize(
    "address", ["6379", "localhost", ":6379", "ray://head:10001", "head:0", "head:70000", "h:p"]
)
def test_a_bad_ray_address_is_refused_naming_the_key(address: str) -> None:

    with pytest.raises(ConfigError, match=r"simulation\.ray_address"):
        RunConfig.from_dict({"simulation": {"ray_address": address}})


def test_ray_address_reaches_flower_init_args_without_local_cpus() -> None:
    from simulations.runner import backend_config

    attached = backend_config(num_cpus_per_client=1.0, verbose=False, ray_address="10.0.0.5:6379")
    assert attached["init_args"]["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in attached["init_args"]  # Ray refuses it when joining a cluster
    local = backend_config(num_cpus_per_client=1.0, verbose=False)
    assert "address" not in local["init_args"] and local["init_args"]["num_cpus"] >= 1
    with pytest.raises(ConfigError, match="--ray-address"):
        backend_config(num_cpus_per_client=1.0, verbose=False, ray_address="nohost")
