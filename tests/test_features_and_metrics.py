import numpy as np
import pandas as pd
import pytest
import torch

from common.accounting import PrivacyUnit
from common.features import (
    build_catalog,
    encode_events,
    evaluation_records,
    stable_hash,
    training_records,
)
from common.model import ModelSpec, Recommender, arrays_sha256, load_state_arrays, state_arrays

SPEC = ModelSpec(product_buckets=257, category_buckets=17, department_buckets=5, history_length=3)


def frame(rows):
    df = pd.DataFrame(rows, columns=["customer_id", "product_id", "ts"])
    return pd.DataFrame(
        {
            "merchant_id": "m",
            "customer_id": df.customer_id,
            "product_id": df.product_id,
            "timestamp": pd.to_datetime(df.ts, utc=True, format="mixed"),
            "quantity": 1.0,
            "price": 1.0,
            "category": "c",
            "department": "d",
            "brand": "",
        }
    )


def test_stable_hash_is_deterministic_and_never_padding():
    values = pd.Series([f"p{i}" for i in range(1000)])
    first, second = stable_hash(values, 64), stable_hash(values, 64)
    assert (first == second).all() and first.min() >= 1 and first.max() <= 63
    assert (
        stable_hash(pd.Series(["p1"]), 1 << 15)[0] == 31320
    )  # pinned: a change would misalign merchants


def test_history_excludes_same_basket_and_other_customers():
    events = frame(
        [
            ("a", "x", "2017-01-01 10:00"),
            ("a", "y", "2017-01-01 10:00"),
            ("a", "z", "2017-01-02"),
            ("b", "w", "2017-01-03"),
        ]
    )
    enc = encode_events(events, SPEC)
    h = dict(
        zip(events.product_id, stable_hash(events.product_id, SPEC.product_buckets), strict=True)
    )
    rows = {int(item): list(hist) for item, hist in zip(enc.item, enc.history, strict=True)}
    assert rows[h["x"]] == [0, 0, 0] and rows[h["y"]] == [0, 0, 0]  # same basket: no peeking
    assert sorted(rows[h["z"]][:2]) == sorted([h["x"], h["y"]]) and rows[h["z"]][2] == 0
    assert rows[h["w"]] == [0, 0, 0]  # another customer's purchases never leak in


def test_context_feeds_history_only():
    train = frame([("a", "x", "2017-01-01")])
    test = frame([("a", "y", "2017-03-01")])
    enc = encode_events(test, SPEC, context=train)
    assert (
        len(enc) == 1
        and enc.history[0, 0] == stable_hash(pd.Series(["x"]), SPEC.product_buckets)[0]
    )


def test_customer_records_group_and_bound_events():
    events = frame(
        [("a", f"p{i}", f"2017-01-{i + 1:02d}") for i in range(10)] + [("b", "q", "2017-01-05")]
    )
    enc = encode_events(events, SPEC)
    cat = build_catalog(events, SPEC)
    rec = training_records(
        enc,
        cat,
        unit=PrivacyUnit.CUSTOMER,
        negatives=2,
        events_per_customer=4,
        rng=np.random.default_rng(0),
    )
    assert len(rec) == 2 and rec.items.shape == (2, 4, 3)
    assert sorted(rec.mask.sum(1).tolist()) == [1.0, 4.0]
    ev = training_records(
        enc,
        cat,
        unit=PrivacyUnit.EVENT,
        negatives=2,
        events_per_customer=4,
        rng=np.random.default_rng(0),
    )
    assert len(ev) == 11 and ev.items.shape == (11, 1, 3)


def test_evaluation_negatives_differ_from_positive():
    events = frame([("a", f"p{i % 7}", f"2017-01-{i + 1:02d}") for i in range(20)])
    enc, cat = encode_events(events, SPEC), build_catalog(events, SPEC)
    rec = evaluation_records(enc, cat, candidates=5, max_cases=10, rng=np.random.default_rng(1))
    items = rec.items[:, 0, :].numpy()
    assert len(rec) == 10 and (items[:, 1:] != items[:, :1]).all()


def test_weights_round_trip_without_prefixes():
    model = Recommender(SPEC)
    arrays = state_arrays(model)
    assert all(not k.startswith("_module") for k in arrays)
    other = Recommender(SPEC)
    load_state_arrays(other, arrays)
    assert arrays_sha256(state_arrays(other)) == arrays_sha256(arrays)
    with pytest.raises(ValueError, match="shape"):
        load_state_arrays(other, {**arrays, "out.bias": np.zeros(3, np.float32)})
    with torch.no_grad():
        out = model(
            torch.zeros(2, 1, 3, dtype=torch.long),
            torch.ones(2, 1, 4, dtype=torch.long),
            torch.ones(2, 1, 4, dtype=torch.long),
            torch.ones(2, 1, 4, dtype=torch.long),
        )
    assert out.shape == (2, 1, 4)
