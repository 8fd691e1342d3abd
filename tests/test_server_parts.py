import json

import numpy as np
import pytest

from common.config import FederationConfig, StrategyKind
from common.errors import CheckpointError, IntegrityError, RejectedUpdateError, TrainingError
from server.checkpoint import Checkpoint, load_latest, save_checkpoint
from server.strategies import (
    FedAdam,
    FedAvg,
    FedProx,
    MerchantUpdate,
    build_strategy,
    weighted_average,
)
from server.update_checks import check_update


def arrays(value, shape=(2, 3)):
    return {"w": np.full(shape, value, np.float32), "b": np.full(3, value, np.float32)}


def test_weighted_average_weights_by_records_and_ignores_arrival_order():
    updates = [MerchantUpdate("b", arrays(3.0), 3), MerchantUpdate("a", arrays(1.0), 1)]
    out = weighted_average(updates)
    assert np.allclose(out["w"], 2.5) and out["w"].dtype == np.float32
    assert all(np.array_equal(out[k], weighted_average(updates[::-1])[k]) for k in out)


def test_fedadam_moves_towards_mean_and_state_round_trips():
    strategy = FedAdam(learning_rate=0.1)
    current = arrays(0.0)
    step1 = strategy.aggregate(current, [MerchantUpdate("a", arrays(1.0), 1)])
    assert np.all(step1["w"] > 0) and np.all(step1["w"] <= 0.1 + 1e-6)
    clone = FedAdam(learning_rate=0.1)
    clone.load_state(strategy.state())
    nxt = [MerchantUpdate("a", arrays(2.0), 1)]
    assert np.array_equal(strategy.aggregate(step1, nxt)["w"], clone.aggregate(step1, nxt)["w"])


def test_strategy_failures_are_fedshop_errors():
    with pytest.raises(TrainingError, match="no examples"):
        weighted_average([])
    with pytest.raises(TrainingError, match="update weight 0"):
        weighted_average([MerchantUpdate("a", arrays(1.0), 0)])
    with pytest.raises(CheckpointError, match="another strategy"):
        build_strategy(FederationConfig()).load_state({"m/w": np.zeros((2, 3), np.float32)})


STRATEGY_CLASSES = {
    StrategyKind.FEDAVG: FedAvg,
    StrategyKind.FEDPROX: FedProx,
    StrategyKind.FEDADAM: FedAdam,
}


def test_every_strategy_kind_has_its_class():
    assert set(STRATEGY_CLASSES) == set(StrategyKind)


@pytest.mark.parametrize("kind", list(StrategyKind), ids=lambda kind: kind.value)
def test_build_strategy_by_enum(kind):
    strategy = build_strategy(FederationConfig(strategy=kind, server_learning_rate=0.05))
    assert type(strategy) is STRATEGY_CLASSES[kind]  # FedProx is a FedAvg: no isinstance
    if isinstance(strategy, FedAdam):
        assert strategy.learning_rate == 0.05


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"w": np.zeros((2, 3), np.float32)}, "names"),
        ({**arrays(0.0), "w": np.zeros((3, 2), np.float32)}, "shape"),
        ({**arrays(0.0), "w": np.full((2, 3), np.nan, np.float32)}, "NaN"),
        ({**arrays(0.0), "w": np.full((2, 3), np.inf, np.float32)}, "Inf"),
        ({**arrays(0.0), "w": np.zeros((2, 3), np.float64)}, "dtype"),
        (arrays(1e6), "norm"),
    ],
)
def test_hostile_updates_rejected(update, reason):
    with pytest.raises(RejectedUpdateError, match=reason):
        check_update(update, arrays(0.0), max_update_norm=100.0)
    check_update(arrays(1.0), arrays(0.0), max_update_norm=100.0)


def test_checkpoint_round_trip_and_latest_pointer(tmp_path):
    for rnd in (1, 2):
        save_checkpoint(
            tmp_path,
            Checkpoint(
                rnd,
                "run",
                "cfg",
                arrays(float(rnd)),
                {"m/w": arrays(0.5)["w"]},
                [{"round": r} for r in range(1, rnd + 1)],
            ),
        )
    latest = load_latest(tmp_path)
    assert latest is not None and latest.round == 2 and np.allclose(latest.model["w"], 2.0)
    assert latest.strategy_state["m/w"].shape == (2, 3) and len(latest.history) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_checkpoint_detected(tmp_path):
    save_checkpoint(tmp_path, Checkpoint(1, "run", "cfg", arrays(1.0), {}, []))
    archive = tmp_path / "round-0001.npz"
    data = bytearray(archive.read_bytes())
    data[-10] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        load_latest(tmp_path)
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "missing.json"}))
    with pytest.raises(CheckpointError):
        load_latest(tmp_path)
