import json

import numpy as np
import pytest

from common.config import FederationConfig, StrategyKind, UpdateDtype
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


def half(value, shape=(2, 3)):
    return {name: a.astype(np.float16) for name, a in arrays(value, shape).items()}


@pytest.mark.parametrize(
    ("update", "dtype", "reason"),
    [
        (arrays(1.0), UpdateDtype.FLOAT16, "dtype float32, expected float16"),
        (half(1.0), UpdateDtype.FLOAT32, "dtype float16, expected float32"),
        ({**half(0.0), "w": np.full((2, 3), np.inf, np.float16)}, UpdateDtype.FLOAT16, "Inf"),
        ({**half(0.0), "w": np.full((2, 3), np.nan, np.float16)}, UpdateDtype.FLOAT16, "NaN"),
        (half(-65504.0), UpdateDtype.FLOAT16, r"at float16's limit .*update_dtype = float32"),
    ],
)
def test_a_float16_update_is_checked_as_received(update, dtype, reason):
    with pytest.raises(RejectedUpdateError, match=reason):
        check_update(update, arrays(0.0), max_update_norm=1e9, dtype=dtype)
    check_update(half(1.0), arrays(0.0), max_update_norm=100.0, dtype=UpdateDtype.FLOAT16)
    with pytest.raises(RejectedUpdateError, match="norm"):  # the norm of what was received
        check_update(half(60000.0), arrays(0.0), max_update_norm=1e4, dtype=UpdateDtype.FLOAT16)


def test_float16_updates_are_aggregated_exactly_into_float32():
    rng = np.random.default_rng(5)
    values = [rng.normal(0, 1, (2, 3)).astype(np.float16) for _ in range(3)]
    weights = [7, 1, 1000]
    updates = [
        MerchantUpdate(f"m{i}", {"w": v, "b": v[0]}, n)
        for i, (v, n) in enumerate(zip(values, weights, strict=True))
    ]
    out = weighted_average(updates)
    exact = sum(v.astype(np.float64) * n for v, n in zip(values, weights, strict=True)) / 1008
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], exact.astype(np.float32))
    np.testing.assert_array_equal(out["w"], weighted_average(updates[::-1])["w"])


def test_a_reply_encodes_its_weights_in_the_update_dtype_and_saturates_beyond_float16():
    from common.protocol import FLOAT16_MAX, beyond_range, encode_update

    trained = {
        "w": np.array([0.1, -1e6, 70000.0, 65519.0], np.float32),
        "b": np.ones(2, np.float32),
    }
    assert encode_update(trained, UpdateDtype.FLOAT32)["w"].dtype == np.float32
    sent = encode_update(trained, UpdateDtype.FLOAT16)
    assert {a.dtype for a in sent.values()} == {np.dtype(np.float16)}
    assert sent["w"].tolist() == [np.float16(0.1), -FLOAT16_MAX, FLOAT16_MAX, FLOAT16_MAX]
    assert np.isfinite(sent["w"]).all()  # never infinite: saturated, and refused by the platform
    assert beyond_range(trained, UpdateDtype.FLOAT16) == 3
    assert beyond_range(trained, UpdateDtype.FLOAT32) == 0
    with pytest.raises(RejectedUpdateError, match="float16's limit"):
        check_update(
            sent,
            {k: np.zeros_like(v, np.float32) for k, v in trained.items()},
            max_update_norm=1e12,
            dtype=UpdateDtype.FLOAT16,
        )
