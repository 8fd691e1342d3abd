"""One-run canary audit: an empirical lower bound on the epsilon of the DP trainer.

Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run"): insert
``m`` canary records, each independently with probability 1/2, train ONE model with the
merchants' own trainer, guess from the model which canaries were in, and turn the number of
correct guesses into the largest epsilon that the result still refutes at confidence
``1 - beta``. A bound above the accountant's claim means the trainer leaks more than it says
(noise off, clipping bypassed, wrong sample rate); a bound below it proves nothing more.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from client.training import DPSettings, LocalTraining, steps_per_round, train_round
from common.accounting import MechanismStep, PrivacyUnit, epsilon_spent, noise_for_target
from common.atomic import atomic_write_json
from common.errors import ConfigError
from common.features import Catalog, RecordTensors, build_catalog, encode_events, training_records
from common.model import Recommender, load_state_arrays, state_arrays
from common.model_spec import ModelSpec
from common.rng import derive_seed, numpy_stream, torch_stream

# --------------------------------------------------------------------------------------------
# The bound (Steinke et al. 2023, Theorem 3.3 and Algorithm 2), written from the paper.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _log_choose(r: int) -> np.ndarray:
    """log C(r, k) for k = 0..r."""
    log_factorial = np.array([math.lgamma(i + 1.0) for i in range(r + 1)])
    values = log_factorial[r] - log_factorial - log_factorial[::-1]
    values.setflags(write=False)
    return values


def _binomial_pmf(r: int, epsilon: float) -> np.ndarray:
    """P[Binomial(r, e^eps / (1 + e^eps)) = k] for k = 0..r, computed in log space."""
    log_q = -float(np.logaddexp(0.0, -epsilon))  # log of e^eps / (1 + e^eps)
    log_not_q = -float(np.logaddexp(0.0, epsilon))
    k = np.arange(r + 1, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        log_pmf = _log_choose(r) + k * log_q + (r - k) * log_not_q
    return np.exp(np.nan_to_num(log_pmf, nan=-np.inf))


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if canaries < 1:
        raise ConfigError(f"canaries must be >= 1, got {canaries!r}")
    if not 0 <= guesses <= canaries:
        raise ConfigError(f"guesses must be in 0..{canaries} (canaries), got {guesses!r}")
    if not 0 <= correct <= guesses:
        raise ConfigError(f"correct must be in 0..{guesses} (guesses), got {correct!r}")


def audit_p_value(
    *, canaries: int, guesses: int, correct: int, epsilon: float, delta: float
) -> float:
    """P[>= ``correct`` right out of ``guesses``] if training were (epsilon, delta)-DP.

    With f(v) = P[Binomial(r, e^eps/(1+e^eps)) >= v] the paper bounds this probability by
    f(v) + 2 m delta max_{1<=i<=v} (f(v-i) - f(v)) / i.
    """
    _check_counts(canaries, guesses, correct)
    if not (epsilon >= 0 and not math.isnan(epsilon)):
        raise ConfigError(f"epsilon must be >= 0, got {epsilon!r}")
    if not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1), got {delta!r}")
    pmf = _binomial_pmf(guesses, min(float(epsilon), 1e4))
    tail = float(pmf[correct:].sum())
    alpha = 0.0
    if correct > 0 and delta > 0:
        below = np.cumsum(pmf[correct - 1 :: -1])  # sum_{j<=i} P[= v - j], i = 1..v
        alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(1.0, tail + 2.0 * canaries * delta * alpha)


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest epsilon that ``correct`` of ``guesses`` right refutes at ``confidence``.

    Returns 0 when the result is consistent with epsilon = 0 (no evidence of leakage). Rounded
    down: the returned value is itself refuted.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    beta = 1.0 - confidence

    def refuted(epsilon: float) -> bool:
        p = audit_p_value(
            canaries=canaries, guesses=guesses, correct=correct, epsilon=epsilon, delta=delta
        )
        return p < beta

    if guesses == 0 or not refuted(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while refuted(high):
        low, high = high, 2.0 * high
    for _ in range(60):
        middle = 0.5 * (low + high)
        if refuted(middle):
            low = middle
        else:
            high = middle
    return low


# --------------------------------------------------------------------------------------------
# Data and canaries
# --------------------------------------------------------------------------------------------


class CanaryScore(Enum):
    """How a canary is scored; fixed before training.

    ``bias-shift``: how far training moved the bias of the canary's positive product from its
    seeded initial value (white box: merchants release weights, so the platform sees them).
    ``margin``: the positive's logit minus the log-sum-exp of its negatives' (black box: what
    someone querying the model sees). Both are valid; bias-shift is much stronger.
    """

    BIAS_SHIFT = "bias-shift"
    MARGIN = "margin"


class CanaryData(Enum):
    """Which real records the canaries hide among."""

    SYNTHETIC = "synthetic"
    COMPLETEJOURNEY = "completejourney"


@dataclass(frozen=True, kw_only=True)
class CanaryConfig:
    """One audit: the DP configuration under test and the audit's own knobs."""

    canaries: int = 1000
    guesses_per_side: int | None = None  # None: 2/5 of the canaries on each side
    target_epsilon: float | None = 3.0
    noise_multiplier: float | None = None  # given: used as is instead of calibrating
    clipping_norm: float = 1.0
    delta: float = 1e-5
    confidence: float = 0.95
    noise_off: bool = False  # negative control: train with sigma = 0, claim the configured sigma
    score: CanaryScore = CanaryScore.BIAS_SHIFT
    epochs: int = 5
    batch_size: int = 1024
    learning_rate: float = 3e-3
    negatives: int = 4
    data: CanaryData = CanaryData.SYNTHETIC
    synthetic_events: int = 6000
    spec: ModelSpec = field(default_factory=ModelSpec)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise ConfigError(f"canaries must be >= 2, got {self.canaries!r}")
        if not 1 <= self.per_side <= self.canaries // 2:
            raise ConfigError(
                f"guesses_per_side must be in 1..{self.canaries // 2}, got {self.per_side!r}"
            )
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError("give exactly one of target_epsilon and noise_multiplier")
        if self.target_epsilon is not None and not (
            self.target_epsilon > 0 and math.isfinite(self.target_epsilon)
        ):
            raise ConfigError(f"target_epsilon must be > 0, got {self.target_epsilon!r}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence!r}")
        for name in ("epochs", "negatives", "synthetic_events"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        DPSettings(noise_multiplier=0.0, clipping_norm=self.clipping_norm)  # validates C
        LocalTraining(batch_size=self.batch_size, learning_rate=self.learning_rate)

    @property
    def per_side(self) -> int:
        if self.guesses_per_side is None:
            return max(1, 2 * self.canaries // 5)
        return self.guesses_per_side


def load_events(config: CanaryConfig) -> pd.DataFrame:
    """The real merchant the canaries are hidden in: one synthetic merchant or CJ's top store."""
    if config.data is CanaryData.COMPLETEJOURNEY:
        from common.completejourney import load_merchants

        return load_merchants(top_n=1)
    from common.synthetic import SyntheticSpec, generate_events

    spec = SyntheticSpec(
        n_merchants=1, events_per_merchant=config.synthetic_events, seed=config.seed
    )
    return generate_events(spec)


def real_records(events: pd.DataFrame, config: CanaryConfig) -> tuple[RecordTensors, Catalog]:
    """Event-level training records exactly as a merchant builds them."""
    catalog = build_catalog(events, config.spec)
    records = training_records(
        encode_events(events, config.spec),
        catalog,
        unit=PrivacyUnit.EVENT,
        negatives=config.negatives,
        events_per_customer=1,
        rng=numpy_stream(config.seed, "canary", "real-negatives"),
    )
    return records, catalog


def make_canaries(
    catalog: Catalog, spec: ModelSpec, *, count: int, negatives: int, rng: np.random.Generator
) -> RecordTensors:
    """``count`` event records that differ only in their positive product.

    Each positive is a distinct product bucket that no real product hashes to, so its
    embedding row and bias move only if its canary is trained on. Everything else (a random
    history of real products, the negatives, the positive's category and department) is drawn
    once and shared: any variation there would move in- and out-canaries' scores alike and
    only blur the guesses.
    """
    free = np.setdiff1d(np.arange(1, spec.product_buckets), catalog.items)
    if len(free) < count:
        raise ConfigError(
            f"only {len(free)} product buckets are unused by the catalogue, fewer than "
            f"{count} canaries: lower the canary count or raise model.product_buckets"
        )
    positive = rng.choice(free, size=count, replace=False)
    history = catalog.items[rng.integers(0, len(catalog), size=spec.history_length)]
    sampled = rng.integers(0, len(catalog), size=negatives)
    category = rng.integers(1, spec.category_buckets)
    department = rng.integers(1, spec.department_buckets)
    items = np.concatenate([positive[:, None], np.tile(catalog.items[sampled], (count, 1))], 1)
    categories = np.tile(np.r_[category, catalog.categories[sampled]], (count, 1))
    departments = np.tile(np.r_[department, catalog.departments[sampled]], (count, 1))
    return RecordTensors(
        history=torch.from_numpy(np.tile(history, (count, 1))[:, None, :].astype(np.int64)),
        items=torch.from_numpy(items[:, None, :].astype(np.int64)),
        categories=torch.from_numpy(categories[:, None, :].astype(np.int64)),
        departments=torch.from_numpy(departments[:, None, :].astype(np.int64)),
        mask=torch.ones((count, 1), dtype=torch.float32),
    )


def _select(records: RecordTensors, rows: np.ndarray) -> RecordTensors:
    index = torch.from_numpy(np.flatnonzero(rows))
    return RecordTensors(*(t[index] for t in records.tensors()))


def _concat(first: RecordTensors, second: RecordTensors) -> RecordTensors:
    return RecordTensors(
        *(torch.cat([a, b]) for a, b in zip(first.tensors(), second.tensors(), strict=True))
    )


# --------------------------------------------------------------------------------------------
# Scores and guesses
# --------------------------------------------------------------------------------------------


def bias_shifts(
    initial: dict[str, np.ndarray], trained: dict[str, np.ndarray], canaries: RecordTensors
) -> np.ndarray:
    """Trained minus initial bias of each canary's positive: only its own canary pushes it up."""
    rows = canaries.items[:, 0, 0].numpy()
    key = "item_bias.weight"
    return (trained[key][rows, 0] - initial[key][rows, 0]).astype(np.float64)


def canary_margins(model: Recommender, canaries: RecordTensors, *, batch: int = 4096) -> np.ndarray:
    """Each canary's positive logit minus the log-sum-exp of its negatives' logits.

    High means memorised. This is minus the logit of the canary's loss, which saturates to
    0 (and ties) once the model is confident; the margin keeps ranking.
    """
    model.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(canaries), batch):
            history, items, categories, departments, _ = (
                t[start : start + batch] for t in canaries.tensors()
            )
            logits = model(history, items, categories, departments).to(torch.float64)
            margin = logits[..., 0] - torch.logsumexp(logits[..., 1:], dim=-1)
            out.append(margin.mean(1).numpy())
    return np.concatenate(out)


def guess_membership(scores: np.ndarray, *, per_side: int) -> np.ndarray:
    """+1 (in) for the ``per_side`` highest scores, -1 (out) for the lowest, 0 to abstain.

    ``per_side`` is fixed before training, so the bound needs no correction for a search.
    """
    if not 1 <= per_side <= len(scores) // 2:
        raise ConfigError(f"per_side must be in 1..{len(scores) // 2}, got {per_side!r}")
    order = np.argsort(-scores, kind="stable")
    guesses = np.zeros(len(scores), dtype=np.int64)
    guesses[order[:per_side]] = 1
    guesses[order[-per_side:]] = -1
    return guesses


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryReport:
    """What one audit found; ``epsilon_lower`` is refuted at ``confidence``."""

    data: str
    score: str
    real_records: int
    canaries: int
    included: int
    guesses: int
    guessed_in: int
    correct: int
    epsilon_lower: float
    confidence: float
    claimed_epsilon: float
    delta: float
    noise_multiplier: float  # the configured sigma the claim is for
    noise_used: float  # what training used: 0 in the negative control
    clipping_norm: float
    sample_rate: float
    steps: int
    epochs: int
    seed: int
    seconds: float

    @property
    def violation(self) -> bool:
        """The trained model leaks provably more than the accountant claims."""
        return self.epsilon_lower > self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "violation": self.violation}


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Silence Opacus' notes on ghost clipping's hooks and on RDP orders: not problems."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook", category=UserWarning)
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        yield


def _noise_multiplier(config: CanaryConfig, sample_rate: float, steps: int) -> float:
    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    assert config.target_epsilon is not None
    return noise_for_target(
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        sample_rate=sample_rate,
        steps=steps,
    )


@dataclass(frozen=True)
class _Trained:
    model: Recommender
    initial: dict[str, np.ndarray]
    trained: dict[str, np.ndarray]
    mechanism: MechanismStep


def _train(config: CanaryConfig, records: RecordTensors, sigma: float) -> _Trained:
    settings = LocalTraining(
        batch_size=config.batch_size,
        local_epochs=config.epochs,
        learning_rate=config.learning_rate,
    )
    with torch.random.fork_rng(devices=[]):  # model initialisation only; global state restored
        torch.manual_seed(derive_seed(config.seed, "canary", "init"))
        model = Recommender(config.spec)
    initial = state_arrays(model)
    with _quiet_opacus():
        result = train_round(
            model=model,
            records=records,
            settings=settings,
            dp=DPSettings(noise_multiplier=sigma, clipping_norm=config.clipping_norm),
            sampling_generator=torch_stream(config.seed, "canary", "sampling"),
            noise_generator=torch_stream(config.seed, "canary", "noise"),
        )
    assert result.mechanism is not None
    trained = Recommender(config.spec)
    load_state_arrays(trained, result.arrays)
    return _Trained(trained, initial, dict(result.arrays), result.mechanism)


def run_canary_audit(config: CanaryConfig, *, events: pd.DataFrame | None = None) -> CanaryReport:
    """Train one model on real records plus a random half of the canaries and bound epsilon.

    ``events`` overrides the data source (a canonical event table of one merchant).
    """
    began = time.perf_counter()
    real, catalog = real_records(load_events(config) if events is None else events, config)
    canaries = make_canaries(
        catalog,
        config.spec,
        count=config.canaries,
        negatives=config.negatives,
        rng=numpy_stream(config.seed, "canary", "canaries"),
    )
    included = numpy_stream(config.seed, "canary", "inclusion").random(config.canaries) < 0.5
    train = _concat(real, _select(canaries, included))
    q, steps = steps_per_round(
        len(train), LocalTraining(batch_size=config.batch_size, local_epochs=config.epochs)
    )
    with _quiet_opacus():
        sigma = _noise_multiplier(config, q, steps)
    run = _train(config, train, 0.0 if config.noise_off else sigma)
    used = run.mechanism
    with _quiet_opacus():
        claimed = epsilon_spent(
            [MechanismStep(sigma, used.sample_rate, used.steps)], delta=config.delta
        )
    if config.score is CanaryScore.BIAS_SHIFT:
        scores = bias_shifts(run.initial, run.trained, canaries)
    else:
        scores = canary_margins(run.model, canaries)
    guesses = guess_membership(scores, per_side=config.per_side)
    truth = np.where(included, 1, -1)
    r = int(np.count_nonzero(guesses))
    correct = int(np.count_nonzero(guesses == truth))
    bound = epsilon_lower_bound(
        canaries=config.canaries,
        guesses=r,
        correct=correct,
        delta=config.delta,
        confidence=config.confidence,
    )
    return CanaryReport(
        data="events" if events is not None else config.data.value,
        score=config.score.value,
        real_records=len(real),
        canaries=config.canaries,
        included=int(included.sum()),
        guesses=r,
        guessed_in=int(np.count_nonzero(guesses == 1)),
        correct=correct,
        epsilon_lower=bound,
        confidence=config.confidence,
        claimed_epsilon=claimed,
        delta=config.delta,
        noise_multiplier=sigma,
        noise_used=used.noise_multiplier,
        clipping_norm=config.clipping_norm,
        sample_rate=used.sample_rate,
        steps=used.steps,
        epochs=config.epochs,
        seed=config.seed,
        seconds=time.perf_counter() - began,
    )


def write_report(report: CanaryReport, path: Path) -> None:
    """Write the report as JSON, atomically (temp file + rename)."""
    atomic_write_json(path, report.to_dict())
