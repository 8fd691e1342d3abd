"""One-run canary audit: an empirical lower bound on the epsilon of the DP trainer.

Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run"): insert
``m`` canary records, each independently with probability 1/2, train ONE model with the
merchants' own trainer (one DP-SGD round of the shared next-basket scorer), guess from the
model which canaries were in, and turn the number of correct guesses into the largest epsilon
that the result still refutes at confidence ``1 - beta``. A bound above the accountant's claim
means the trainer leaks more than it says (noise off, clipping bypassed, wrong sample rate); a
bound below it proves nothing more.
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

from client.merchant_data import TrainingData, period_log
from client.nextbasket_training import train_scorer
from client.training import DPSettings, LocalTraining, steps_per_round
from common.accounting import (
    MIN_NOISE_MULTIPLIER,
    MechanismStep,
    PrivacyUnit,
    epsilon_spent,
    noise_for_target,
)
from common.atomic import atomic_write_json
from common.errors import ConfigError
from common.nextbasket.model import BasketScorer, RecordTensors, load_shared_arrays, shared_arrays
from common.nextbasket.records import (
    NEGATIVE,
    PADDING,
    POSITIVE,
    RecordArrays,
    training_records,
)
from common.nextbasket.spec import RecordSpec, ScorerSpec
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

    ``bias-shift``: how far training moved the product bias of the canary's positives from
    its seeded initial value (white box: merchants release the shared weights, so the
    platform sees them). ``margin``: the trained scorer's score of each positive minus the
    log-sum-exp of the record's (corrected) negative scores, averaged over the positives: minus
    the canary record's loss before the softplus (black box: what someone querying the model
    sees). Both are valid.
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
    items_per_canary: int = 1  # positives of a canary's target basket
    data: CanaryData = CanaryData.SYNTHETIC
    synthetic_events: int = 6000
    spec: ScorerSpec = field(default_factory=ScorerSpec)
    records: RecordSpec = field(default_factory=RecordSpec)
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
        if self.noise_multiplier is not None and not self.noise_multiplier >= MIN_NOISE_MULTIPLIER:
            raise ConfigError(
                f"noise_multiplier must be >= {MIN_NOISE_MULTIPLIER:g}, got "
                f"{self.noise_multiplier!r} (below it epsilon is unbounded: no claim to audit; "
                "--no-noise trains without noise as a control)"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence!r}")
        for name in ("epochs", "items_per_canary", "synthetic_events"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.items_per_canary > self.records.max_positives:
            raise ConfigError(
                f"items_per_canary must be <= records.max_positives "
                f"({self.records.max_positives}), got {self.items_per_canary!r}"
            )
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


@dataclass(frozen=True)
class RealRecords:
    """A merchant's event-level training records and the product buckets its products use."""

    records: RecordArrays
    used_buckets: np.ndarray  # sorted hashed product ids of every product in the merchant's log


def real_records(events: pd.DataFrame, config: CanaryConfig) -> RealRecords:
    """Event-level training records exactly as a merchant builds them (client.merchant_data)."""
    data = TrainingData.of(period_log([events], config.spec))
    records = training_records(
        data.cases,
        data.features,
        data.items,
        unit=PrivacyUnit.EVENT,
        spec=config.records,
        rng=numpy_stream(config.seed, "canary", "real-records"),
    )
    if len(records) == 0:
        raise ConfigError("the merchant's events give no training records to hide canaries in")
    return RealRecords(records, np.unique(data.items[:, 0]))


def make_canaries(
    real: RealRecords,
    spec: ScorerSpec,
    *,
    count: int,
    items_per_canary: int,
    rng: np.random.Generator,
) -> RecordArrays:
    """``count`` event records (target baskets) that differ only in their positive products.

    One real record with at least ``items_per_canary`` positives (and a negative) is drawn as
    the template: its household features, its negatives and its first ``items_per_canary``
    positives' features, category and department are shared by every canary (its other
    positives are dropped).
    Each canary's positives are distinct product buckets that no product of the merchant
    hashes to, so their product biases move only if that canary is trained on. Any variation
    in what is shared would move included and excluded canaries' scores alike and only blur
    the guesses; the canaries are exchangeable, so inclusion is independent of everything else.
    """
    records = real.records
    if records.target.shape[1] != 1:
        raise ConfigError("canaries hide among event-level records (one basket per record)")
    free = np.setdiff1d(np.arange(1, spec.product_buckets), real.used_buckets)
    needed = count * items_per_canary
    if len(free) < needed:
        raise ConfigError(
            f"only {len(free)} product buckets are unused by the merchant's products, fewer "
            f"than the {needed} canary products: lower the canary count or raise "
            "model.product_buckets"
        )
    positives = (records.target[:, 0] == POSITIVE).sum(axis=1)
    negatives = (records.target[:, 0] == NEGATIVE).sum(axis=1)
    eligible = np.flatnonzero((positives >= items_per_canary) & (negatives > 0))
    if len(eligible) == 0:
        raise ConfigError(
            f"no real basket has {items_per_canary} rankable items and a negative to model a "
            "canary on: lower items_per_canary"
        )
    template = int(eligible[rng.integers(len(eligible))])
    features = records.features[template].copy()
    items = records.items[template].copy()
    log_q = records.log_q[template].copy()
    target = records.target[template].copy()
    slots = np.flatnonzero(target[0] == POSITIVE)
    keep, drop = slots[:items_per_canary], slots[items_per_canary:]
    target[0, drop] = PADDING
    features[0, drop], items[0, drop], log_q[0, drop] = 0.0, 0, 0.0
    tiled = RecordArrays(
        features=np.repeat(features[None], count, axis=0),
        items=np.repeat(items[None], count, axis=0),
        log_q=np.repeat(log_q[None], count, axis=0),
        target=np.repeat(target[None], count, axis=0),
    )
    buckets = rng.choice(free, size=needed, replace=False).reshape(count, items_per_canary)
    tiled.items[:, 0, keep, 0] = buckets
    return tiled


def _select(records: RecordArrays, rows: np.ndarray) -> RecordArrays:
    index = np.flatnonzero(rows)
    return RecordArrays(
        records.features[index], records.items[index], records.log_q[index], records.target[index]
    )


def _concat(first: RecordArrays, second: RecordArrays) -> RecordArrays:
    return RecordArrays(
        *(
            np.concatenate([getattr(first, name), getattr(second, name)])
            for name in ("features", "items", "log_q", "target")
        )
    )


# --------------------------------------------------------------------------------------------
# Scores and guesses
# --------------------------------------------------------------------------------------------


def canary_products(canaries: RecordArrays) -> np.ndarray:
    """[canaries, items_per_canary] the hashed positive products of each canary."""
    target = canaries.target[:, 0]
    per = int((target[0] == POSITIVE).sum())
    return canaries.items[:, 0, :, 0][target == POSITIVE].reshape(len(canaries), per)


def bias_shifts(
    initial: dict[str, np.ndarray], trained: dict[str, np.ndarray], canaries: RecordArrays
) -> np.ndarray:
    """Trained minus initial product bias of each canary's positives (their mean): only its own
    canary pushes them."""
    rows = canary_products(canaries)
    key = "product_bias.weight"
    shift = trained[key][rows, 0].astype(np.float64) - initial[key][rows, 0].astype(np.float64)
    return shift.mean(axis=1)


def canary_margins(model: BasketScorer, canaries: RecordArrays, *, batch: int = 1024) -> np.ndarray:
    """Each canary's positive scores minus the log-sum-exp of its log_q-corrected negative
    scores, averaged over its positives: high means memorised.

    The record's loss is the softplus of minus this, which saturates to 0 (and ties) once the
    model is confident; the margin keeps ranking.
    """
    tensors = RecordTensors.of(canaries)
    model.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(tensors), batch):
            features, items, log_q, target = (t[start : start + batch] for t in tensors.tensors())
            scores = model(features, items).to(torch.float64).reshape(target.shape)
            negative = target == NEGATIVE
            masked = torch.where(negative, scores + log_q, torch.full_like(scores, -torch.inf))
            partition = torch.logsumexp(masked, dim=-1, keepdim=True)
            positive = (target == POSITIVE).to(scores.dtype)
            margin = ((scores - partition) * positive).sum(-1) / positive.sum(-1)
            out.append(margin[:, 0].numpy())
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
    """Silence Opacus' notes on RDP orders: not problems."""
    with warnings.catch_warnings():
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
    model: BasketScorer
    initial: dict[str, np.ndarray]
    trained: dict[str, np.ndarray]
    mechanism: MechanismStep


def _train(config: CanaryConfig, records: RecordArrays, sigma: float) -> _Trained:
    """One DP round of the merchants' trainer (client.nextbasket_training.train_scorer)."""
    settings = LocalTraining(
        batch_size=config.batch_size,
        local_epochs=config.epochs,
        learning_rate=config.learning_rate,
    )
    with torch.random.fork_rng(devices=[]):  # model initialisation only; global state restored
        torch.manual_seed(derive_seed(config.seed, "canary", "init"))
        model = BasketScorer(config.spec)
    initial = dict(shared_arrays(model))
    with _quiet_opacus():
        result = train_scorer(
            model=model,
            records=RecordTensors.of(records),
            settings=settings,
            dp=DPSettings(noise_multiplier=sigma, clipping_norm=config.clipping_norm),
            sampling_generator=torch_stream(config.seed, "canary", "sampling"),
            noise_generator=torch_stream(config.seed, "canary", "noise"),
        )
    assert result.mechanism is not None
    trained = BasketScorer(config.spec)  # the released weights, as anyone holding them sees them
    load_shared_arrays(trained, result.arrays)
    return _Trained(trained, initial, dict(result.arrays), result.mechanism)


def run_canary_audit(config: CanaryConfig, *, events: pd.DataFrame | None = None) -> CanaryReport:
    """Train one model on real records plus a random half of the canaries and bound epsilon.

    ``events`` overrides the data source (a canonical event table of one merchant).
    """
    began = time.perf_counter()
    real = real_records(load_events(config) if events is None else events, config)
    canaries = make_canaries(
        real,
        config.spec,
        count=config.canaries,
        items_per_canary=config.items_per_canary,
        rng=numpy_stream(config.seed, "canary", "canaries"),
    )
    included = numpy_stream(config.seed, "canary", "inclusion").random(config.canaries) < 0.5
    train = _concat(real.records, _select(canaries, included))
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
        real_records=len(real.records),
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
