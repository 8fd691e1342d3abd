"""``fedshop simulate --data``: own event files in, every bad input refused before anything is
written, merchants selected and split like Complete Journey's."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from common.config import DataSource, RunConfig
from common.configparse import apply_overrides
from common.datasets import load_dataset
from common.errors import ConfigError, DataValidationError, ExitCode
from common.merchant_files import read_merchant_files, select_merchants
from common.split import SplitRule
from common.synthetic import SyntheticSpec, generate_events
from simulations import cli
from simulations.provision import RunLayout, provision

# Own column names: what a shop system might export. Attribute columns are left out.
RENAMES = {
    "customer_id": "household",
    "product_id": "sku",
    "timestamp": "sold_at",
    "quantity": "qty",
    "price": "unit_price",
}
MAP = [f"{source}={field}" for field, source in RENAMES.items()] + ["till=-"]
SMALL = ["data.min_rows=1", "federation.min_merchants=2"]


def shop_frames(n_merchants: int = 3, events: int = 400) -> dict[str, pd.DataFrame]:
    """Per-merchant event tables in the shops' own column names, timestamps as text."""
    spec = SyntheticSpec(n_merchants=n_merchants, events_per_merchant=events, n_products=200)
    canonical = generate_events(spec)
    frames = {}
    for merchant, group in canonical.groupby("merchant_id"):
        own = group.drop(columns=["week", "category", "department", "brand"]).rename(
            columns=RENAMES
        )
        own["sold_at"] = own["sold_at"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        own["till"] = "T1"
        frames[str(merchant)] = own.reset_index(drop=True)
    return frames


def write_folder(folder: Path, frames: dict[str, pd.DataFrame]) -> Path:
    folder.mkdir(parents=True)
    for merchant, frame in frames.items():
        frame.drop(columns=["merchant_id"]).to_csv(folder / f"{merchant}.csv", index=False)
    return folder


def write_one_file(path: Path, frames: dict[str, pd.DataFrame]) -> Path:
    pd.concat(frames.values(), ignore_index=True).to_csv(path, index=False)
    return path


def simulate_cli(data: Path, out: Path, *extra: str) -> int:
    maps = [arg for item in MAP for arg in ("--map", item)]
    sets = [arg for item in SMALL for arg in ("--set", item)]
    return cli.main(["simulate", "--data", str(data), *maps, *sets, "--out", str(out), *extra])


def files_config(data: Path, *overrides: str) -> RunConfig:
    settings = {"data": {"source": "files", "path": str(data), "mapping": MAP}}
    return RunConfig.from_dict(apply_overrides(settings, [*SMALL, *overrides]))


# --------------------------------------------------------------------------- reading files


def test_folder_names_merchants_and_absent_attributes_read_as_empty(tmp_path: Path) -> None:
    frames = shop_frames()
    folder = write_folder(tmp_path / "shops", frames)
    files = read_merchant_files(folder, mapping=dict(item.split("=") for item in MAP))
    assert sorted(files.sources) == sorted(frames)
    assert files.sources["merchant-001"] == str(folder / "merchant-001.csv")
    assert len(files.events) == sum(len(f) for f in frames.values())
    assert (files.events[["category", "department", "brand"]] == "").all().all()


def test_one_file_with_a_merchant_column(tmp_path: Path) -> None:
    path = write_one_file(tmp_path / "all.csv", shop_frames())
    dataset = load_dataset(files_config(path))
    assert sorted(dataset.sources) == ["merchant-000", "merchant-001", "merchant-002"]
    assert set(dataset.sources.values()) == {str(path)}


def test_no_merchant_column_and_no_per_merchant_files(tmp_path: Path, capsys) -> None:
    frames = shop_frames()
    path = tmp_path / "all.csv"
    pd.concat(frames.values()).drop(columns=["merchant_id"]).to_csv(path, index=False)
    out = tmp_path / "run"
    assert simulate_cli(path, out) == ExitCode.DATA
    err = capsys.readouterr().err
    assert f"file {path}" in err and "missing required column 'merchant_id'" in err
    assert "one file per merchant" in err and "--map" in err
    assert not out.exists()


def test_a_bad_row_in_one_of_several_files_provisions_nothing(tmp_path: Path, capsys) -> None:
    frames = shop_frames()
    frames["merchant-002"].loc[6, "qty"] = -3.0  # data row 7 of that file
    folder = write_folder(tmp_path / "shops", frames)
    out = tmp_path / "run"
    assert simulate_cli(folder, out) == ExitCode.DATA
    err = capsys.readouterr().err
    assert f"file {folder / 'merchant-002.csv'}, row 7, column 'quantity'" in err
    assert "expected a finite number > 0, got '-3.0'" in err
    assert not out.exists()


def test_a_merchant_without_test_events_is_named(tmp_path: Path, capsys) -> None:
    frames = shop_frames()
    early = frames["merchant-001"]
    frames["merchant-001"] = early[early["sold_at"] < "2017-06-01"].reset_index(drop=True)
    folder = write_folder(tmp_path / "shops", frames)
    out = tmp_path / "run"
    assert simulate_cli(folder, out) == ExitCode.DATA
    err = capsys.readouterr().err
    assert "merchant 'merchant-001' has no test events" in err
    assert str(folder / "merchant-001.csv") in err and "span split" in err
    assert not out.exists()


def test_a_merchant_without_training_events_is_named(tmp_path: Path) -> None:
    frames = shop_frames()
    late = frames["merchant-000"]
    frames["merchant-000"] = late[late["sold_at"] >= "2017-12-01"].reset_index(drop=True)
    path = write_one_file(tmp_path / "all.csv", frames)
    with pytest.raises(DataValidationError, match="'merchant-000' has no training events"):
        provision(files_config(path), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_one_merchant_in_two_files_is_refused(tmp_path: Path) -> None:
    frames = shop_frames()
    folder = write_folder(tmp_path / "shops", frames)
    both = frames["merchant-000"].assign(merchant_id="merchant-001")
    both.to_csv(folder / "extra.csv", index=False)
    with pytest.raises(DataValidationError, match="'merchant-001' also has events in"):
        read_merchant_files(folder, mapping=dict(item.split("=") for item in MAP))


@pytest.mark.parametrize(
    ("name", "message"),
    [("bad name.csv", "not a valid merchant name"), ("notes.txt", "unsupported file type")],
)
def test_file_names_that_cannot_be_merchants(tmp_path: Path, name: str, message: str) -> None:
    folder = write_folder(tmp_path / "shops", shop_frames(2))
    frame = shop_frames(1)["merchant-000"].drop(columns=["merchant_id"])
    frame.to_csv(folder / name, index=False)
    with pytest.raises(DataValidationError, match=message) as info:
        read_merchant_files(folder, mapping=dict(item.split("=") for item in MAP))
    assert info.value.file == str(folder / name)


def test_an_empty_folder_and_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.csv").write_text("x\n")
    with pytest.raises(DataValidationError, match="holds no event files"):
        read_merchant_files(tmp_path / "empty")
    with pytest.raises(DataValidationError, match="no such file or folder"):
        read_merchant_files(tmp_path / "nowhere.csv")


def test_map_without_data_and_resume_with_data_are_refused(tmp_path: Path, capsys) -> None:
    assert cli.main(["simulate", "--map", "qty=quantity", "--out", str(tmp_path / "r")]) == 3
    assert "--map renames columns of --data files" in capsys.readouterr().err
    code = cli.main(["simulate", "--resume", str(tmp_path), "--data", str(tmp_path)])
    assert code == ExitCode.CONFIG and "drop --config/--set/--data" in capsys.readouterr().err


# --------------------------------------------------------------------------- selection


def test_selection_ranks_by_events_then_id_and_keeps_at_most_top_n() -> None:
    events = pd.DataFrame({"merchant_id": ["b"] * 3 + ["a"] * 3 + ["c"] * 5 + ["d"]})
    chosen = select_merchants(events, top_n=3, min_rows=2)
    assert sorted(set(chosen["merchant_id"])) == ["a", "b", "c"]
    assert sorted(set(select_merchants(events, top_n=2, min_rows=2)["merchant_id"])) == ["a", "c"]
    assert set(select_merchants(events, top_n=10, min_rows=4)["merchant_id"]) == {"c"}
    with pytest.raises(ConfigError, match=r"no merchant has at least 6 events.*c \(5\)"):
        select_merchants(events, top_n=3, min_rows=6)


def test_top_n_and_min_rows_apply_to_own_files(tmp_path: Path) -> None:
    frames = shop_frames(4)
    frames["merchant-003"] = frames["merchant-003"].iloc[:100]
    path = write_one_file(tmp_path / "all.csv", frames)
    dataset = load_dataset(files_config(path, "data.min_rows=200", "data.top_n=2"))
    assert sorted(dataset.events["merchant_id"].unique()) == ["merchant-000", "merchant-001"]


def test_excluded_merchants_are_left_out_after_selection(tmp_path: Path) -> None:
    frames = shop_frames()
    early = frames["merchant-001"]  # a shop that closed: no test events
    frames["merchant-001"] = early[early["sold_at"] < "2017-06-01"].reset_index(drop=True)
    path = write_one_file(tmp_path / "all.csv", frames)
    dataset = load_dataset(files_config(path, "data.exclude=merchant-001"))
    assert sorted(dataset.parts()) == ["merchant-000", "merchant-002"]
    assert sorted(dataset.sources) == ["merchant-000", "merchant-002"]
    # top_n chooses first (merchant-001, trimmed, is the smallest): the excluded merchant
    # does not make room for another
    two = load_dataset(files_config(path, "data.top_n=2", "data.exclude=merchant-000"))
    assert list(pd.unique(two.events["merchant_id"])) == ["merchant-002"]


@pytest.mark.parametrize(
    ("exclude", "message"),
    [
        ("merchant-009", r"data.exclude names \['merchant-009'\], not among the selected"),
        ("merchant-000,merchant-001,merchant-002", "leaves out every selected merchant"),
        ("merchant-000,merchant-000", "each once"),
    ],
)
def test_bad_exclusions_are_named(tmp_path: Path, exclude: str, message: str) -> None:
    path = write_one_file(tmp_path / "all.csv", shop_frames())
    with pytest.raises(ConfigError, match=message):
        load_dataset(files_config(path, f"data.exclude={exclude}"))


# --------------------------------------------------------------------------- split and layout


def test_provisioned_own_data_is_split_by_the_span(tmp_path: Path) -> None:
    path = write_one_file(tmp_path / "all.csv", shop_frames())
    config = files_config(path)
    assert config.data.source is DataSource.FILES and config.data.split_rule is SplitRule.SPAN
    layout = provision(config, tmp_path / "run")
    split = layout.time_split()
    events = pd.concat(
        pd.read_parquet(layout.merchants / m / "events.parquet") for m in layout.merchant_ids()
    )
    everything = load_dataset(config).events
    first, last = everything["timestamp"].min(), everything["timestamp"].max()
    assert split.test.start == (last - (last - first) * 0.1).floor("s")
    assert events["timestamp"].max() < split.train.end
    assert layout.merchant_config("merchant-000").cohort == split.cohort()
    assert RunConfig.from_toml(layout.config).data.path == str(path)


def test_explicit_dates_override_the_span(tmp_path: Path) -> None:
    path = write_one_file(tmp_path / "all.csv", shop_frames())
    config = files_config(path, "data.train_until=2017-09-01", "data.valid_until=2017-11-01")
    split = load_dataset(config).split
    assert split.rule is SplitRule.DATES
    assert split.train.end == pd.Timestamp("2017-09-01", tz="UTC")
    assert split.test.start == pd.Timestamp("2017-11-01", tz="UTC")


def test_online_flag_is_checked_before_anything_is_provisioned(tmp_path: Path, capsys) -> None:
    path = write_one_file(tmp_path / "all.csv", shop_frames())
    cases = [("weeks", "FIRST-LAST"), ("2-10", "holds training events"), ("50-90", "past the data")]
    for spec, message in cases:
        out = tmp_path / f"run-{spec}"
        assert simulate_cli(path, out, "--online", spec) == ExitCode.CONFIG
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_layout_records_the_split(tmp_path: Path) -> None:
    path = write_one_file(tmp_path / "all.csv", shop_frames())
    layout = provision(files_config(path, "data.slice_days=3"), tmp_path / "run")
    split = RunLayout(layout.root).time_split()
    assert split.slice_days == 3
    held_out = split.held_out_slices(last_event=split.test.start)
    assert held_out[0].start == split.train.end
