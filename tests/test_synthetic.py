"""Synthetic merchant logs: schema, determinism, speed and the signals the knobs promise."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError
from common.events import KEY_COLUMNS, validate_events
from common.split import week_of
from common.synthetic import ORIGIN, SyntheticSpec, generate_events

SMALL = SyntheticSpec(n_merchants=3, customers_per_merchant=50, events_per_merchant=2_000, seed=7)


def test_output_is_canonical_with_consistent_weeks() -> None:
    frame = generate_events(SMALL)
    validated = validate_events(frame, source="synthetic", extra_columns=("week",))
    pd.testing.assert_frame_equal(validated, frame)
    assert len(frame) == 3 * 2_000
    assert not frame.duplicated(list(KEY_COLUMNS)).any()
    assert (week_of(frame["timestamp"], origin=ORIGIN) == frame["week"].to_numpy()).all()
    assert frame["week"].between(1, 53).all() and frame["week"].nunique() == 53
    assert frame["merchant_id"].nunique() == 3


def test_same_seed_same_table_other_seed_other_table() -> None:
    pd.testing.assert_frame_equal(generate_events(SMALL), generate_events(SMALL))
    other = generate_events(SyntheticSpec(**{**SMALL.__dict__, "seed": 8}))
    assert not other["product_id"].equals(generate_events(SMALL)["product_id"])


def test_merchants_do_not_depend_on_how_many_there_are() -> None:
    two = generate_events(SyntheticSpec(**{**SMALL.__dict__, "n_merchants": 2}))
    three = generate_events(SMALL)
    pd.testing.assert_frame_equal(two, three[three["merchant_id"] != "merchant-002"])


@pytest.mark.slow
def test_hundred_thousand_events_are_fast() -> None:
    """A guard against per-event Python loops, not a benchmark: about 0.3 s on an idle
    machine, so a shared two-core CI runner gets a generous bound."""
    spec = SyntheticSpec(n_merchants=10, customers_per_merchant=1_000, events_per_merchant=10_000)
    best = min(_timed(spec) for _ in range(2))
    assert best < 10.0, f"100k events took {best:.2f} s"


def _timed(spec: SyntheticSpec) -> float:
    start = time.perf_counter()
    generate_events(spec)
    return time.perf_counter() - start


def repeat_share(frame: pd.DataFrame) -> float:
    """Share of events whose product the customer had bought before."""
    ordered = frame.sort_values(["customer_id", "timestamp"])
    return float(ordered.duplicated(["customer_id", "product_id"]).mean())


def test_repeat_rate_controls_rebuying() -> None:
    base = {**SMALL.__dict__, "n_products": 5_000}
    none = repeat_share(generate_events(SyntheticSpec(**{**base, "repeat_rate": 0.0})))
    most = repeat_share(generate_events(SyntheticSpec(**{**base, "repeat_rate": 0.8})))
    assert most > 0.75 > 0.4 > none


def category_spread(frame: pd.DataFrame) -> float:
    """Mean total-variation distance between merchants' category distributions."""
    shares = pd.crosstab(frame["merchant_id"], frame["category"], normalize="index").to_numpy()
    pairs = [(i, j) for i in range(len(shares)) for j in range(i + 1, len(shares))]
    return float(np.mean([0.5 * np.abs(shares[i] - shares[j]).sum() for i, j in pairs]))


def test_merchant_skew_makes_merchants_non_iid() -> None:
    base = {**SMALL.__dict__, "repeat_rate": 0.0, "events_per_merchant": 5_000}
    iid = category_spread(generate_events(SyntheticSpec(**{**base, "merchant_skew": 0.0})))
    skewed = category_spread(generate_events(SyntheticSpec(**{**base, "merchant_skew": 1.0})))
    assert skewed > iid + 0.2


def test_drift_rotates_preferences_over_time() -> None:
    base = {**SMALL.__dict__, "repeat_rate": 0.0, "n_merchants": 1, "events_per_merchant": 20_000}

    def top5_share(values: pd.Series) -> float:
        return float(values.value_counts(normalize=True).iloc[:5].sum())

    def shares(drift: float) -> tuple[float, float]:
        """Top-5 share of the year's categories, as bought and with the rotation undone."""
        frame = generate_events(SyntheticSpec(**{**base, "drift": drift}))
        category = frame["category"].str.removeprefix("cat-").astype(int)
        unrotated = (category - np.floor(drift * (frame["week"] - 1)).astype(int)) % 20
        return top5_share(category), top5_share(unrotated)

    still_raw, still_unrotated = shares(0.0)
    moving_raw, moving_unrotated = shares(1.0)
    assert still_raw == still_unrotated > 0.4
    assert moving_raw < still_raw - 0.1  # preferences spread over the year's categories
    assert abs(moving_unrotated - still_unrotated) < 0.05  # one category per week, exactly


def test_history_predicts_better_than_popularity() -> None:
    frame = generate_events(SyntheticSpec(n_merchants=3, customers_per_merchant=300, seed=3))
    train, test = frame[frame["week"] <= 40], frame[frame["week"] > 40]
    popular = train.groupby("merchant_id")["product_id"].agg(
        lambda s: set(s.value_counts()[:10].index)
    )
    history = train.groupby("customer_id")["product_id"].agg(
        lambda s: set(s.value_counts()[:10].index)
    )
    bought = test["product_id"]
    pop_hits = np.mean([p in popular[m] for m, p in zip(test["merchant_id"], bought, strict=True)])
    hist_hits = np.mean(
        [p in history.get(c, set()) for c, p in zip(test["customer_id"], bought, strict=True)]
    )
    assert hist_hits > 1.5 * pop_hits


@pytest.mark.parametrize(
    "bad",
    [
        {"n_merchants": 0},
        {"weeks": 54},
        {"repeat_rate": 1.5},
        {"merchant_skew": -0.1},
        {"drift": -1.0},
        {"n_categories": 2_000, "n_products": 100},
        {"popularity_skew": float("nan")},
    ],
)
def test_bad_specs_name_the_knob(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SyntheticSpec(**bad)  # type: ignore[arg-type]
