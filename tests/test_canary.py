"""The one-run canary audit: the bound against closed forms and scipy, the canaries, the
guesses, the negative control (noise off must be caught) and DP on (must not be)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from common.accounting import MechanismStep, epsilon_spent
from common.errors import ConfigError, ExitCode
from common.nextbasket.features import FEATURES
from common.nextbasket.model import BasketScorer, BasketSoftmaxLoss, RecordTensors
from common.nextbasket.records import NEGATIVE, PADDING, POSITIVE, RecordArrays
from common.nextbasket.spec import RecordSpec, ScorerSpec
from simulations.canary import (
    CanaryConfig,
    CanaryReport,
    CanaryScore,
    RealRecords,
    audit_p_value,
    bias_shifts,
    canary_margins,
    canary_products,
    epsilon_lower_bound,
    guess_membership,
    make_canaries,
    run_canary_audit,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ScorerSpec(
    product_buckets=4096,
    category_buckets=64,
    department_buckets=16,
    embedding_dim=8,
    hidden_dim=16,
)
RECORDS = RecordSpec(max_positives=6, history_negatives=8, uniform_negatives=8)


# ----------------------------------------------------------------------------- the bound


def scipy_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's p-value, computed independently with scipy.stats.binom."""
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = stats.binom.sf(v - 1, r, q)  # P[Binomial(r, q) >= v]
    alpha = (
        max(
            (stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - 1 - i, r, q)) / i
            for i in range(1, v + 1)
        )
        if v > 0
        else 0.0
    )
    return min(1.0, tail + 2 * m * delta * alpha)


def test_all_correct_matches_closed_form_and_grows_with_guesses():
    # delta = 0, v = r: p = q^r, so the bound is logit(beta^(1/r)).
    bounds = []
    for r in (10, 50, 200, 1000):
        q = 0.05 ** (1 / r)
        expected = math.log(q / (1 - q))
        got = epsilon_lower_bound(canaries=1000, guesses=r, correct=r, delta=0.0)
        assert got == pytest.approx(expected, abs=1e-9)
        bounds.append(got)
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert bounds[0] == pytest.approx(1.0519, abs=1e-4) and bounds[-1] == pytest.approx(
        5.809, abs=1e-3
    )


def test_half_correct_proves_nothing_and_small_counts_neither():
    for r in (10, 100, 800):
        assert epsilon_lower_bound(canaries=1000, guesses=r, correct=r // 2, delta=1e-5) == 0.0
    assert epsilon_lower_bound(canaries=1000, guesses=0, correct=0, delta=1e-5) == 0.0
    # 4 of 4 right has probability 1/16 > 5 % even at epsilon 0.
    assert epsilon_lower_bound(canaries=1000, guesses=4, correct=4, delta=0.0) == 0.0


def test_ninety_percent_of_a_thousand_is_about_two():
    """The documented ceiling: ~1000 canaries at 90 % correct prove only epsilon ~ 2."""
    bound = epsilon_lower_bound(canaries=1000, guesses=1000, correct=900, delta=1e-5)
    assert 1.9 < bound < 2.1


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (1000, 800, 700, 1.5, 1e-5),
        (1000, 800, 786, 3.0, 1e-5),
        (100, 60, 50, 0.5, 1e-3),
        (1000, 1000, 1000, 5.0, 1e-5),
        (50, 20, 0, 1.0, 1e-2),
        (2000, 500, 260, 0.0, 1e-6),
        (10, 10, 9, 2.0, 0.0),
    ],
)
def test_p_value_matches_scipy(m, r, v, eps, delta):
    ours = audit_p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta)
    assert ours == pytest.approx(scipy_p_value(m, r, v, eps, delta), rel=1e-8, abs=1e-15)


@pytest.mark.parametrize(("r", "v"), [(800, 786), (800, 700), (200, 180), (1000, 620)])
def test_bound_is_tight_against_scipy(r, v):
    """At the bound scipy's p-value is below beta; a hair above it, it no longer is."""
    bound = epsilon_lower_bound(canaries=1000, guesses=r, correct=v, delta=1e-5)
    assert bound > 0
    assert scipy_p_value(1000, r, v, bound, 1e-5) <= 0.05 * (1 + 1e-9)
    assert scipy_p_value(1000, r, v, bound * (1 + 1e-4), 1e-5) > 0.05
    assert scipy_p_value(1000, r, v, bound * (1 - 1e-4), 1e-5) < 0.05


def test_delta_and_confidence_weaken_the_bound():
    plain = epsilon_lower_bound(canaries=1000, guesses=800, correct=760, delta=0.0)
    with_delta = epsilon_lower_bound(canaries=1000, guesses=800, correct=760, delta=1e-4)
    stricter = epsilon_lower_bound(
        canaries=1000, guesses=800, correct=760, delta=0.0, confidence=0.99
    )
    assert plain > with_delta > 0 and plain > stricter > 0


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 400), data=st.data())
def test_bound_monotone_in_correct_guesses(r, data):
    v = data.draw(st.integers(0, r - 1))
    lower = epsilon_lower_bound(canaries=1000, guesses=r, correct=v, delta=1e-5)
    higher = epsilon_lower_bound(canaries=1000, guesses=r, correct=v + 1, delta=1e-5)
    assert 0.0 <= lower <= higher
    p = audit_p_value(canaries=1000, guesses=r, correct=v, epsilon=1.0, delta=1e-5)
    assert 0.0 <= p <= 1.0


def test_bound_rejects_impossible_counts():
    with pytest.raises(ConfigError, match="correct"):
        epsilon_lower_bound(canaries=10, guesses=5, correct=6, delta=1e-5)
    with pytest.raises(ConfigError, match="guesses"):
        epsilon_lower_bound(canaries=10, guesses=11, correct=1, delta=1e-5)
    with pytest.raises(ConfigError, match="confidence"):
        epsilon_lower_bound(canaries=10, guesses=5, correct=5, delta=1e-5, confidence=1.0)
    with pytest.raises(ConfigError, match="delta"):
        audit_p_value(canaries=10, guesses=5, correct=5, epsilon=1.0, delta=1.0)


# ------------------------------------------------------------------- canaries and guesses


def real_of(used: list[int], *, records: int = 30, seed: int = 0) -> RealRecords:
    """Random event-level records over the products ``used`` (1 to 4 positives each)."""
    rng = np.random.default_rng(seed)
    c = RECORDS.candidates
    target = np.full((records, 1, c), PADDING, dtype=np.int8)
    for row, positives in enumerate(rng.integers(1, 5, records)):
        target[row, 0, :positives] = POSITIVE
        target[row, 0, positives : positives + 10] = NEGATIVE
    items = np.stack(
        [
            rng.choice(np.array(used), (records, 1, c)),
            rng.integers(1, 64, (records, 1, c)),
            rng.integers(1, 16, (records, 1, c)),
        ],
        axis=-1,
    )
    arrays = RecordArrays(
        features=rng.random((records, 1, c, len(FEATURES)), dtype=np.float32),
        items=items.astype(np.int64),
        log_q=rng.random((records, 1, c), dtype=np.float32),
        target=target,
    )
    return RealRecords(arrays, np.unique(used))


def test_canaries_differ_only_in_unused_positive_products():
    real = real_of(list(range(1, 4000, 2)))  # odd buckets are the merchant's products
    canaries = make_canaries(
        real, TINY, count=500, items_per_canary=2, rng=np.random.default_rng(0)
    )
    products = canary_products(canaries)
    assert products.shape == (500, 2) and len(np.unique(products)) == 1000
    assert not np.isin(products, real.used_buckets).any() and (products > 0).all()
    assert ((canaries.target == POSITIVE).sum(axis=(1, 2)) == 2).all()
    positive = canaries.target[0, 0] == POSITIVE
    for array in (canaries.features, canaries.log_q, canaries.target, canaries.items[..., 1:]):
        assert (array == array[:1]).all()
    assert (canaries.items[:, :, ~positive] == canaries.items[:1, :, ~positive]).all()
    # the template is one real record: its negatives, household features and ids, unchanged
    negative = canaries.target[0, 0] == NEGATIVE
    kept = canaries.target[0, 0] != PADDING
    matches = [
        i
        for i in range(len(real.records))
        if np.array_equal(real.records.target[i, 0] == NEGATIVE, negative)
        and np.array_equal(real.records.features[i, 0, kept], canaries.features[0, 0, kept])
        and np.array_equal(real.records.items[i, 0, negative], canaries.items[0, 0, negative])
        and np.array_equal(
            real.records.items[i, 0, positive, 1:], canaries.items[0, 0, positive, 1:]
        )
    ]
    assert len(matches) == 1
    assert ((canaries.target == NEGATIVE).sum(axis=(1, 2)) == negative.sum()).all()


def test_too_many_canaries_for_the_free_buckets_is_refused():
    real = real_of(list(range(1, 4090)))
    with pytest.raises(ConfigError, match="product_buckets"):
        make_canaries(real, TINY, count=10, items_per_canary=1, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="items_per_canary"):
        make_canaries(
            real_of([1, 3, 5]), TINY, count=2, items_per_canary=5, rng=np.random.default_rng(0)
        )
    without_negatives = real_of([1, 3, 5])
    target = without_negatives.records.target
    target[target == NEGATIVE] = PADDING
    with pytest.raises(ConfigError, match="a negative"):
        make_canaries(
            without_negatives, TINY, count=2, items_per_canary=1, rng=np.random.default_rng(0)
        )


def test_bias_shift_reads_each_positive_row():
    canaries = make_canaries(
        real_of([1, 3, 5]), TINY, count=3, items_per_canary=1, rng=np.random.default_rng(1)
    )
    rows = canary_products(canaries)[:, 0]
    initial = {"product_bias.weight": np.zeros((TINY.product_buckets, 1), dtype=np.float32)}
    trained = {"product_bias.weight": np.zeros((TINY.product_buckets, 1), dtype=np.float32)}
    initial["product_bias.weight"][rows[2], 0] = 0.5
    trained["product_bias.weight"][rows, 0] = [0.5, -0.25, 0.75]
    trained["product_bias.weight"][1, 0] = 9.0  # a real product's row: ignored
    assert bias_shifts(initial, trained, canaries).tolist() == [0.5, -0.25, 0.25]


def test_margin_is_minus_the_loss_logit_and_follows_the_bias():
    """With one positive, the record's loss is softplus(-margin) (BasketSoftmaxLoss computed
    independently); canaries share all but the product, so the bias alone orders them."""
    canaries = make_canaries(
        real_of(list(range(1, 400, 2))),
        TINY,
        count=6,
        items_per_canary=1,
        rng=np.random.default_rng(2),
    )
    torch.manual_seed(0)
    model = BasketScorer(TINY)
    bias = np.array([0.3, -1.0, 2.0, 0.0, 1.5, -0.2])
    with torch.no_grad():
        model.product_bias.weight[torch.from_numpy(canary_products(canaries)[:, 0]), 0] = (
            torch.tensor(bias, dtype=torch.float32)
        )
    margins = canary_margins(model, canaries, batch=4)
    assert np.argsort(margins).tolist() == np.argsort(bias).tolist()
    assert margins - bias == pytest.approx(np.full(6, margins[3] - bias[3]), abs=1e-5)
    tensors = RecordTensors.of(canaries)
    loss = BasketSoftmaxLoss()
    loss.reduction = "none"
    with torch.no_grad():
        per_record = loss(model(tensors.features, tensors.items), tensors.log_q, tensors.target)
    assert per_record.numpy() == pytest.approx(np.logaddexp(0.0, -margins), rel=1e-5)


def test_guesses_take_the_extremes():
    margins = -np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    assert guess_membership(margins, per_side=2).tolist() == [0, 1, -1, 0, -1, 1]
    with pytest.raises(ConfigError, match="per_side"):
        guess_membership(margins, per_side=4)


def test_config_validation_names_the_value():
    with pytest.raises(ConfigError, match="exactly one"):
        CanaryConfig(target_epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="guesses_per_side"):
        CanaryConfig(canaries=10, guesses_per_side=6)
    with pytest.raises(ConfigError, match="-1"):
        CanaryConfig(target_epsilon=-1.0)
    with pytest.raises(ConfigError, match=r"noise_multiplier must be >= 0\.3, got 0\.1"):
        CanaryConfig(target_epsilon=None, noise_multiplier=0.1)
    with pytest.raises(ConfigError, match="items_per_canary"):
        CanaryConfig(items_per_canary=7, records=RECORDS)
    assert CanaryConfig(canaries=1000).per_side == 400


# ----------------------------------------------------------------------- the audit itself


def small(**changes: Any) -> CanaryConfig:
    base = CanaryConfig(
        canaries=40,
        target_epsilon=1.0,
        epochs=1,
        batch_size=128,
        learning_rate=0.01,
        synthetic_events=300,
        spec=TINY,
        records=RECORDS,
        seed=3,
    )
    return replace(base, **changes)


@pytest.mark.slow
def test_small_audit_is_consistent_and_reproducible(tmp_path):
    config = small(target_epsilon=None, noise_multiplier=1.2)  # no calibration: faster
    first, second = run_canary_audit(config), run_canary_audit(config)
    assert replace(first, seconds=0.0) == replace(second, seconds=0.0)
    assert first.guesses == 2 * config.per_side == 32 and first.guessed_in == 16
    assert 0 < first.included < 40 and first.real_records > 0
    assert first.noise_used == first.noise_multiplier > 0
    claimed = epsilon_spent(
        [MechanismStep(first.noise_multiplier, first.sample_rate, first.steps)], delta=1e-5
    )
    assert first.claimed_epsilon == pytest.approx(claimed) and first.noise_multiplier == 1.2
    batches = math.ceil((first.real_records + first.included) / 128)
    assert first.sample_rate == pytest.approx(1 / batches)
    expected = epsilon_lower_bound(
        canaries=40, guesses=first.guesses, correct=first.correct, delta=1e-5
    )
    assert first.epsilon_lower == expected
    write_report(first, tmp_path / "out" / "canary.json")
    saved = json.loads((tmp_path / "out" / "canary.json").read_text())
    assert saved["correct"] == first.correct and saved["violation"] is False
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["canary.json"]


@pytest.mark.slow
@pytest.mark.parametrize("score", list(CanaryScore))
def test_negative_control_is_caught_and_dp_is_not(score):
    """Claim epsilon 1: with noise off the bound must exceed 2; with noise on, not exceed 1."""
    config = small(
        canaries=1000,
        epochs=5,
        batch_size=512,
        learning_rate=0.02,
        synthetic_events=2000,
        seed=1,
        score=score,
    )
    control = run_canary_audit(replace(config, noise_off=True))
    private = run_canary_audit(config)
    assert control.noise_used == 0 and control.claimed_epsilon == pytest.approx(1.0, abs=0.01)
    assert control.epsilon_lower > 2 * control.claimed_epsilon
    assert control.violation and control.correct / control.guesses > 0.95
    assert private.noise_used == private.noise_multiplier > 0
    assert private.epsilon_lower <= private.claimed_epsilon and not private.violation
    assert private.correct / private.guesses < 0.6


# -------------------------------------------------------------------------------- the CLI


def test_cli_module_is_light():
    code = (
        "import sys, simulations.commands.canary; "
        "print(sorted(m for m in ('torch', 'opacus', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def parse(argv: list[str]) -> argparse.Namespace:
    from simulations.cli import build_parser

    return build_parser().parse_args(argv)


def test_cli_registers_the_audit_subcommand_only():
    from simulations.commands.canary import register_canary

    args = parse(["audit", "canary", "--canaries", "200", "--no-noise", "--epsilon", "2"])
    assert args.canaries == 200 and args.no_noise and args.epsilon == 2.0
    with pytest.raises(SystemExit):
        parse(["audit", "canary", "--epsilon", "1", "--noise-multiplier", "2"])
    with pytest.raises(SystemExit):
        parse(["audit-canary", "--canaries", "200"])  # one spelling: the alias is gone
    parser = argparse.ArgumentParser()
    group = parser.add_subparsers(dest="audit_command")
    register_canary(group)
    nested = parser.parse_args(["canary", "--seed", "5"])
    assert nested.seed == 5 and callable(nested.handler)


def test_cli_config_file_and_flags(tmp_path):
    from simulations.commands.canary import config_from_args

    toml = tmp_path / "run.toml"
    toml.write_text(
        "seed = 11\n[privacy]\nepsilon_cap = 2.5\ndelta = 1e-6\nclipping_norm = 0.5\n"
        "[model]\nproduct_buckets = 4096\nembedding_dim = 8\n"
        '[training]\nbatch_size = 64\n[data]\nsource = "synthetic"\n'
    )
    config = config_from_args(parse(["audit", "canary", "--config", str(toml)]))
    assert (config.target_epsilon, config.delta, config.clipping_norm) == (2.5, 1e-6, 0.5)
    # the privacy settings and the model come from the run; the audit's batch is its own
    assert config.seed == 11 and config.batch_size == 1024
    assert config.spec.product_buckets == 4096 and config.spec.embedding_dim == 8
    assert config.data.value == "synthetic" and config.noise_multiplier is None
    flags = ["--noise-multiplier", "1.5", "--clipping-norm", "2", "--seed", "4"]
    config = config_from_args(parse(["audit", "canary", "--config", str(toml), *flags]))
    assert (config.target_epsilon, config.noise_multiplier) == (None, 1.5)
    assert config.clipping_norm == 2.0 and config.seed == 4


def fake_report(**changes: Any) -> CanaryReport:
    base = CanaryReport(
        data="synthetic",
        score="bias-shift",
        real_records=10,
        canaries=100,
        included=50,
        guesses=80,
        guessed_in=40,
        correct=40,
        epsilon_lower=0.0,
        confidence=0.95,
        claimed_epsilon=1.0,
        delta=1e-5,
        noise_multiplier=2.0,
        noise_used=2.0,
        clipping_norm=1.0,
        sample_rate=0.5,
        steps=4,
        epochs=1,
        seed=0,
        seconds=0.1,
    )
    return replace(base, **changes)


@pytest.mark.parametrize(
    ("argv", "report", "code"),
    [
        ([], fake_report(), ExitCode.OK),
        ([], fake_report(epsilon_lower=1.5), ExitCode.PRIVACY_VIOLATION),
        (["--no-noise"], fake_report(epsilon_lower=1.5, noise_used=0.0), ExitCode.OK),
        (["--no-noise"], fake_report(noise_used=0.0), ExitCode.AUDIT_INCONCLUSIVE),
    ],
)
def test_cli_exit_codes(monkeypatch, capsys, tmp_path, argv, report, code):
    import simulations.canary as canary
    from simulations.cli import main

    monkeypatch.setattr(canary, "run_canary_audit", lambda config: report)
    out = tmp_path / "report.json"
    assert main(["audit", "canary", "--data", "synthetic", "--json", str(out), *argv]) == code
    printed = capsys.readouterr()
    assert "lower bound (95%)" in printed.out
    assert json.loads(out.read_text())["epsilon_lower"] == report.epsilon_lower
    if code == ExitCode.PRIVACY_VIOLATION:
        assert "VIOLATION" in printed.err
