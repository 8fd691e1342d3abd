"""Full-catalogue scoring at the merchant: the NumPy scorer against the torch model it serves."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.errors import ConfigError
from common.features import stable_hash
from common.model import Recommender, state_arrays
from common.publication import ModelDescriptor
from common.recommender_scorer import MODEL_KIND, RecommenderScorer, describe
from common.scoring import Catalogue, MerchantView, best_k, build_scorer

sys.path.insert(0, str(Path(__file__).parent / "support"))
from serving_world import SPEC, random_arrays


def events() -> pd.DataFrame:
    """Three customers; products p0..p59 in 6 categories; c2 buys p3 twice (a repeat)."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(120):
        customer = f"c{i % 3}"
        product = int(rng.integers(0, 60))
        rows.append((customer, f"p{product}", f"cat{product % 6}", f"dep{product % 2}", i))
    rows += [("c2", "p3", "cat3", "dep1", 200), ("c2", "p3", "cat3", "dep1", 201)]
    frame = pd.DataFrame(
        rows, columns=["customer_id", "product_id", "category", "department", "second"]
    )
    frame["timestamp"] = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(
        frame.pop("second"), unit="s"
    )
    frame["merchant_id"] = "m1"
    return frame


def trained_looking_model(seed: int) -> Recommender:
    torch.manual_seed(seed)
    model = Recommender(SPEC)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)  # biases off zero, repeats matter
    return model


def test_scores_equal_the_torch_forward_pass_for_every_catalogue_product() -> None:
    frame = events()
    model = trained_looking_model(0)
    scorer = RecommenderScorer(1, SPEC, state_arrays(model), frame)
    catalogue = scorer.catalogue
    items = torch.from_numpy(stable_hash(pd.Series(catalogue.product_ids), SPEC.product_buckets))
    cats = torch.from_numpy(stable_hash(pd.Series(catalogue.categories), SPEC.category_buckets))
    deps = torch.from_numpy(stable_hash(pd.Series(catalogue.departments), SPEC.department_buckets))
    for customer in ("c0", "c1", "c2", "a stranger"):
        history = scorer.history(customer)
        padded = np.zeros(SPEC.history_length, np.int64) if history is None else history
        with torch.no_grad():
            expected = model(
                torch.from_numpy(padded)[None, None, :],
                items[None, None, :],
                cats[None, None, :],
                deps[None, None, :],
            )[0, 0].numpy()
        np.testing.assert_allclose(scorer.scores(padded), expected, rtol=1e-5, atol=1e-5)


def test_history_is_the_last_purchases_and_a_repeat_changes_the_score() -> None:
    frame = events()
    scorer = RecommenderScorer(1, SPEC, random_arrays(1), frame)
    c2 = frame[frame["customer_id"] == "c2"].sort_values("timestamp")
    expected = stable_hash(c2["product_id"].tail(SPEC.history_length), SPEC.product_buckets)
    np.testing.assert_array_equal(scorer.history("c2"), expected)
    history = scorer.history("c2")
    assert history is not None
    without_repeat = np.where(history == history[-1], 0, history)
    p3 = int(np.flatnonzero(scorer.catalogue.product_ids == "p3")[0])
    assert scorer.scores(history)[p3] != pytest.approx(scorer.scores(without_repeat)[p3])


def test_top_k_is_sorted_with_ties_in_catalogue_order_and_cold_start_is_not_an_error() -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    index, values = best_k(scores, 3)
    np.testing.assert_array_equal(index, [[1, 4, 0], [0, 1, 2]])
    np.testing.assert_array_equal(values, np.array([[0.9, 0.9, 0.5], [1, 1, 1]], np.float32))
    assert best_k(scores, 99)[0].shape == (2, 5)

    scorer = RecommenderScorer(1, SPEC, random_arrays(2), events())
    top = scorer.top_k(["c0", "nobody", "c1"], 7)
    assert top.products.shape == (3, 7) and list(top.known) == [True, False, True]
    assert all(np.all(np.diff(row) <= 0) for row in top.scores)
    assert set(top.products.reshape(-1)) <= set(scorer.catalogue.product_ids)
    cold = scorer.top_k(["nobody", "someone else"], 7)
    np.testing.assert_array_equal(cold.products[0], cold.products[1])  # non-personal ranking


def test_the_publication_names_the_scorer_and_its_shape() -> None:
    view = MerchantView(events(), Path("/nonexistent"))
    scorer = build_scorer(4, describe(SPEC), random_arrays(1), view)
    assert scorer.version_id == 4 and len(scorer.catalogue) == len(Catalogue.from_events(events()))
    with pytest.raises(ConfigError, match="cannot be served"):
        build_scorer(4, ModelDescriptor("next-big-thing/9", {}), random_arrays(1), view)
    wider = ModelDescriptor(MODEL_KIND, dataclasses.asdict(dataclasses.replace(SPEC, hidden_dim=8)))
    with pytest.raises(ConfigError, match="do not fit"):
        build_scorer(4, wider, random_arrays(1), view)
    with pytest.raises(ConfigError, match="not valid"):
        build_scorer(4, ModelDescriptor(MODEL_KIND, {"colour": 3}), random_arrays(1), view)


def test_serving_code_does_not_import_torch() -> None:
    import subprocess

    code = (
        "import sys, client.serving.http, client.serving.batch, common.recommender_scorer;"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
