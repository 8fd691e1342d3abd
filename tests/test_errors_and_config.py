import pytest

from common.config import RunConfig, dump_toml
from common.configparse import apply_overrides
from common.errors import (
    CheckpointError,
    ConfigError,
    DataValidationError,
    ExitCode,
    FedshopError,
    IntegrityError,
    LedgerError,
    PrivacyBudgetExceededError,
)
from simulations.cli import main


def test_exit_codes_are_distinct_and_documented():
    classes = [
        ConfigError,
        DataValidationError,
        PrivacyBudgetExceededError,
        LedgerError,
        IntegrityError,
        CheckpointError,
    ]
    codes = [c.exit_code for c in classes]
    assert len(set(codes)) == len(codes) and ExitCode.INTERNAL not in codes
    assert all(issubclass(c, FedshopError) for c in classes)


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


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["training.learning_rate=0.5", "privacy.noise_multiplier=1.25", "privacy.unit=customer"],
        ["data.train_weeks=2,30", "data.valid_weeks=31,35", "data.test_weeks=36,40", "seed=7"],
    ],
)
def test_dump_toml_reads_back_equal(tmp_path, overrides):
    config = RunConfig.from_dict(apply_overrides({}, overrides))
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(config.to_dict()), encoding="utf-8")
    assert RunConfig.from_toml(path) == config
