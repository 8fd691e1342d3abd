"""Next-basket recommendation on the 10 busiest Complete Journey stores: every baseline and the
two-part scorer (centralised, local-only, federated; non-private and DP at epsilon 1, 3, 8 for
both privacy units; with and without the merchant-local part), on the same full-ranking cases.

Protocol: docs/evaluation.md. Federated training is an in-process FedAvg loop (local
DP-SGD rounds, averaged by record counts), the same arithmetic the Flower strategy performs.
Writes docs/results.md, docs/results.json and docs/results_ndcg.png (part of `make bench`).

Usage: python benchmarks/quality.py [--seeds 3] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing
import pickle
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from quality_report import Report, write_report

from client.evaluation import neighbour_scores
from client.nextbasket_local import HeldOut, fit_local_state, raw_scores, scores_with
from client.nextbasket_training import train_scorer
from client.training import DPSettings, LocalTraining, steps_per_round
from common.accounting import MechanismStep, PrivacyUnit, epsilon_spent, noise_for_target
from common.atomic import atomic_write_bytes
from common.completejourney import load_merchants
from common.config import OptimizerKind
from common.nextbasket import baselines
from common.nextbasket.baskets import (
    BasketLog,
    CaseSet,
    basket_cases,
    heldout_cases,
    merchant_logs,
)
from common.nextbasket.features import HistoryFeatures, history_features, merchant_popularity
from common.nextbasket.local import LocalState
from common.nextbasket.metrics import MetricSums, bootstrap_ci, case_metrics, sampled_ndcg
from common.nextbasket.model import (
    BasketScorer,
    RecordTensors,
    load_shared_arrays,
    shared_arrays,
)
from common.nextbasket.records import count_records, item_ids, training_records
from common.nextbasket.spec import RecordSpec, ScorerSpec
from common.rng import derive_seed, numpy_stream, torch_stream

ROOT = Path(__file__).resolve().parents[1]
TRAIN, VALID, TEST = (1, 40), (41, 44), (45, 53)
EPSILONS = (1.0, 3.0, 8.0)
UNITS = (PrivacyUnit.EVENT, PrivacyUnit.CUSTOMER)
REPORT_METRICS = ("ndcg@10", "recall@10", "ndcg@20", "recall@20")
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Schedule:
    """The training plan every trained method shares (rounds x local epochs of passes)."""

    rounds: int = 6
    local_epochs: int = 2
    event_batch: int = 256
    customer_batch: int = 32
    learning_rate: float = 1e-2
    clipping_norm: float = 1.0
    delta: float = 1e-5

    def settings(self, unit: PrivacyUnit) -> LocalTraining:
        batch = self.event_batch if unit is PrivacyUnit.EVENT else self.customer_batch
        return LocalTraining(
            batch_size=batch,
            local_epochs=self.local_epochs,
            learning_rate=self.learning_rate,
            optimizer=OptimizerKind.ADAM,
        )


@dataclass
class Merchant:
    log: BasketLog
    train: CaseSet
    train_features: HistoryFeatures
    items: np.ndarray
    held: dict[str, HeldOut]


@dataclass
class Method:
    """Per-case test metrics of one method, one array per seed (values: [cases])."""

    name: str
    family: str
    seeds: list[dict[str, dict[str, np.ndarray]]] = field(default_factory=list)
    sampled: list[dict[str, np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0
    epsilon: float | None = None
    unit: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


def prepare(spec: ScorerSpec) -> dict[str, Merchant]:
    frame = load_merchants(top_n=10, min_rows=10_000)
    merchants = {}
    for name, log in merchant_logs(frame, source="completejourney").items():
        train = basket_cases(log, weeks=TRAIN, catalogue_weeks=TRAIN)
        items = item_ids(log, spec)
        held = {}
        for split, period in (("valid", VALID), ("test", TEST)):
            cases = heldout_cases(log, period=period, catalogue_weeks=TRAIN)
            popularity = merchant_popularity(log, before_week=period[0])[cases.catalogue]
            neighbours = neighbour_scores(log, cases)
            held[split] = HeldOut(
                cases, history_features(log, cases), popularity, items, neighbours=neighbours
            )
        merchants[name] = Merchant(log, train, history_features(log, train), items, held)
    return merchants


# ----------------------------------------------------------------------------- evaluation


def test_metrics(scores: dict[str, np.ndarray], data: dict[str, Merchant], seed: int):
    per_case, sampled = {}, {}
    for name, merchant in data.items():
        cases = merchant.held["test"].cases
        per_case[name] = case_metrics(scores[name], cases)
        rng = numpy_stream(seed, "sampled-evaluation", name)
        sampled[name] = sampled_ndcg(scores[name], cases, rng=rng)
    return per_case, sampled


def record(method: Method, scores: dict[str, np.ndarray], data: dict[str, Merchant]) -> None:
    per_case, sampled = test_metrics(scores, data, seed=0)  # sampled cases fixed for all
    method.seeds.append(per_case)
    method.sampled.append(sampled)


# ----------------------------------------------------------------------------- baselines


def run_baselines(data: dict[str, Merchant], seeds: int) -> list[Method]:
    out = []
    for name, score in (
        ("G-TopFreq", lambda m, h: baselines.g_topfreq(h.cases, _pop(m, h))),
        ("P-TopFreq", lambda m, h: baselines.p_topfreq(m.log, h.cases, _pop(m, h))),
    ):
        began = time.perf_counter()
        method = Method(name, "local heuristic")
        record(method, {n: score(m, m.held["test"]) for n, m in data.items()}, data)
        method.seconds = time.perf_counter() - began
        out.append(method)
    out.append(run_tifu(data))
    out.append(run_als(data, seeds))
    return out


def _pop(merchant: Merchant, held: HeldOut) -> np.ndarray:
    """Popularity per product code (the baselines index it by product code)."""
    full = np.zeros(merchant.log.n_products)
    full[held.cases.catalogue] = held.popularity
    return full


def _ndcg(scores: np.ndarray, cases: CaseSet) -> float:
    return MetricSums.of(case_metrics(scores, cases)).mean("ndcg@10")


def run_tifu(data: dict[str, Merchant]) -> Method:
    began = time.perf_counter()
    method = Method("TIFU-KNN", "local heuristic")
    scores, chosen = {}, {}
    for name, m in data.items():
        valid, test = m.held["valid"], m.held["test"]

        def objective(scores: np.ndarray, h: HeldOut = valid) -> float:
            return _ndcg(scores, h.cases)

        best, _ = baselines.tune_tifu(m.log, valid.cases, _pop(m, valid), objective)
        chosen[name] = asdict(best)
        scores[name] = baselines.tifu_knn(m.log, test.cases, _pop(m, test), best)
    record(method, scores, data)
    method.seconds = time.perf_counter() - began
    method.extra["parameters"] = chosen
    return method


def run_als(data: dict[str, Merchant], seeds: int) -> Method:
    began = time.perf_counter()
    method = Method("ALS (implicit, central, non-private)", "central")
    logs = {n: m.log for n, m in data.items()}

    def split_inputs(split: str):
        cases = {n: m.held[split].cases for n, m in data.items()}
        pops = {n: _pop(m, m.held[split]) for n, m in data.items()}
        return cases, pops

    cases, pops = split_inputs("valid")

    def objective(params: baselines.AlsParams) -> float:
        out = baselines.als_scores(logs, cases, pops, before_week=VALID[0], params=params, seed=0)
        total = sum((MetricSums.of(case_metrics(out[n], cases[n])) for n in data), MetricSums())
        return total.mean("ndcg@10")

    best = max(baselines.ALS_GRID, key=objective)
    cases, pops = split_inputs("test")
    for seed in range(seeds):
        out = baselines.als_scores(logs, cases, pops, before_week=TEST[0], params=best, seed=seed)
        record(method, out, data)
    method.seconds = time.perf_counter() - began
    method.extra["parameters"] = asdict(best)
    return method


# ----------------------------------------------------------------------------- training


def records_for(
    m: Merchant, spec: RecordSpec, unit: PrivacyUnit, seed: int, *stream: object
) -> RecordTensors:
    rng = numpy_stream(seed, "records", *stream)  # type: ignore[arg-type]
    arrays = training_records(m.train, m.train_features, m.items, unit=unit, spec=spec, rng=rng)
    return RecordTensors.of(arrays)


def _concat(parts: list[RecordTensors]) -> RecordTensors:
    return RecordTensors(*[torch.cat([p.tensors()[i] for p in parts]) for i in range(4)])


@dataclass(frozen=True)
class Privacy:
    epsilon: float | None  # None: non-private
    unit: PrivacyUnit = PrivacyUnit.EVENT


def plan_sigma(
    m: Merchant, privacy: Privacy, schedule: Schedule, rounds: int
) -> tuple[DPSettings | None, MechanismStep | None, float]:
    """Sigma for the target epsilon over all planned rounds, as plan_round does."""
    if privacy.epsilon is None:
        return None, None, math.nan
    n = count_records(m.train, privacy.unit)
    q, steps = steps_per_round(n, schedule.settings(privacy.unit))
    delta = min(schedule.delta, 1.0 / (10 * n))
    sigma = noise_for_target(
        target_epsilon=privacy.epsilon, delta=delta, sample_rate=q, steps=steps * rounds
    )
    step = MechanismStep(sigma, q, steps)
    spent = epsilon_spent([MechanismStep(sigma, q, steps * rounds)], delta=delta)
    return DPSettings(noise_multiplier=sigma, clipping_norm=schedule.clipping_norm), step, spent


def local_round(
    m: Merchant,
    name: str,
    arrays: Arrays,
    *,
    spec: ScorerSpec,
    record_spec: RecordSpec,
    privacy: Privacy,
    dp: DPSettings | None,
    schedule: Schedule,
    seed: int,
    stream: tuple[object, ...],
) -> tuple[Arrays, int, float]:
    records = records_for(m, record_spec, privacy.unit, seed, *stream, name)
    model = BasketScorer(spec)
    load_shared_arrays(model, arrays)
    result = train_scorer(
        model=model,
        records=records,
        settings=schedule.settings(privacy.unit),
        dp=dp,
        sampling_generator=torch_stream(seed, *stream, name, "sampling"),
        noise_generator=torch_stream(seed, *stream, name, "noise"),
    )
    return result.arrays, len(records), result.seconds


def validation_sums(weights: Arrays, spec: ScorerSpec, merchants: list[Merchant]) -> MetricSums:
    """Validation metric sums of ``weights`` over ``merchants`` (what each would report)."""
    total = MetricSums()
    for m in merchants:
        held = m.held["valid"]
        scores = baselines.break_ties(raw_scores(weights, spec, held), held.popularity)
        total = total + MetricSums.of(case_metrics(scores, held.cases))
    return total


class BestRound:
    """Keeps the weights of the round with the best validation NDCG@10."""

    def __init__(self) -> None:
        self.weights: Arrays | None = None
        self.value = -math.inf
        self.round = -1

    def offer(self, weights: Arrays, sums: MetricSums, round_: int) -> None:
        if sums.mean("ndcg@10") > self.value:
            self.weights, self.value, self.round = weights, sums.mean("ndcg@10"), round_


def initial(spec: ScorerSpec, seed: int) -> Arrays:
    torch.manual_seed(derive_seed(seed, "initial-model"))
    return shared_arrays(BasketScorer(spec))


def train_federated(
    data: dict[str, Merchant],
    spec: ScorerSpec,
    record_spec: RecordSpec,
    privacy: Privacy,
    schedule: Schedule,
    seed: int,
    timings: dict[str, list[float]],
    rounds_kept: list[int],
) -> tuple[Arrays, dict[str, float]]:
    """FedAvg: every merchant trains the global weights locally, the platform averages them
    weighted by record counts and keeps the round whose validation metric sums (reported by
    the merchants) are best. Returns the weights and each merchant's epsilon."""
    plans = {n: plan_sigma(m, privacy, schedule, schedule.rounds) for n, m in data.items()}
    weights = initial(spec, seed)
    best = BestRound()
    tag = f"fed-{privacy.epsilon}-{privacy.unit.value}"
    for round_ in range(schedule.rounds):
        updates, sizes = [], []
        for name, m in data.items():
            arrays, size, seconds = local_round(
                m, name, weights, spec=spec, record_spec=record_spec, privacy=privacy,
                dp=plans[name][0], schedule=schedule, seed=seed, stream=(tag, round_),
            )  # fmt: skip
            updates.append(arrays)
            sizes.append(size)
            timings.setdefault(name, []).append(seconds)
        share = np.asarray(sizes, dtype=np.float64) / sum(sizes)
        weights = {
            k: np.sum([s * u[k] for s, u in zip(share, updates, strict=True)], axis=0).astype(
                np.float32
            )
            for k in weights
        }
        best.offer(weights, validation_sums(weights, spec, list(data.values())), round_)
    assert best.weights is not None
    rounds_kept.append(best.round)
    return best.weights, {n: p[2] for n, p in plans.items()}


def train_local(
    data: dict[str, Merchant],
    spec: ScorerSpec,
    record_spec: RecordSpec,
    privacy: Privacy,
    schedule: Schedule,
    seed: int,
) -> tuple[dict[str, Arrays], dict[str, float]]:
    """Each merchant alone, the same rounds x epochs of passes over its own data; each keeps
    the round that is best on its own validation cases."""
    out, spent = {}, {}
    tag = f"local-{privacy.epsilon}-{privacy.unit.value}"
    for name, m in data.items():
        dp, _, eps = plan_sigma(m, privacy, schedule, schedule.rounds)
        weights = initial(spec, seed)
        best = BestRound()
        for round_ in range(schedule.rounds):
            weights, _, _ = local_round(
                m, name, weights, spec=spec, record_spec=record_spec, privacy=privacy, dp=dp,
                schedule=schedule, seed=seed, stream=(tag, round_),
            )  # fmt: skip
            best.offer(weights, validation_sums(weights, spec, [m]), round_)
        assert best.weights is not None
        out[name], spent[name] = best.weights, eps
    return out, spent


def train_central(
    data: dict[str, Merchant],
    spec: ScorerSpec,
    record_spec: RecordSpec,
    schedule: Schedule,
    seed: int,
) -> Arrays:
    """All merchants' records pooled, no DP, the same passes over the data; the round with
    the best pooled validation NDCG@10 is kept."""
    model = BasketScorer(spec)
    load_shared_arrays(model, initial(spec, seed))
    settings = schedule.settings(PrivacyUnit.EVENT)
    best = BestRound()
    for round_ in range(schedule.rounds):
        parts = [
            records_for(m, record_spec, PrivacyUnit.EVENT, seed, "central", round_, n)
            for n, m in data.items()
        ]
        train_scorer(
            model=model,
            records=_concat(parts),
            settings=settings,
            dp=None,
            sampling_generator=torch_stream(seed, "central", round_, "sampling"),
            noise_generator=torch_stream(seed, "central", round_, "noise"),
        )
        weights = shared_arrays(model)
        best.offer(weights, validation_sums(weights, spec, list(data.values())), round_)
    assert best.weights is not None
    return best.weights


# ----------------------------------------------------------------------------- variants


def shared_only(weights: dict[str, Arrays], spec: ScorerSpec, data: dict[str, Merchant]):
    """The trained weights as they are (global or local), ties broken by popularity."""
    out = {}
    for name, m in data.items():
        held = m.held["test"]
        raw = raw_scores(weights[name], spec, held)
        out[name] = baselines.break_ties(raw, held.popularity)
    return out


def with_local_part(
    weights: dict[str, Arrays],
    spec: ScorerSpec,
    record_spec: RecordSpec,
    data: dict[str, Merchant],
    seed: int,
    *,
    personalise: bool,
) -> tuple[dict[str, np.ndarray], dict[str, LocalState]]:
    scores, states = {}, {}
    for name, m in data.items():
        records = (
            records_for(m, record_spec, PrivacyUnit.EVENT, seed, "personal", name)
            if personalise
            else None
        )
        state = fit_local_state(
            merchant_id=name,
            shared=weights[name],
            spec=spec,
            records=records,
            validation=m.held["valid"],
            generator=torch_stream(seed, "personal", name),
        )
        scores[name] = scores_with(state, weights[name], spec, m.held["test"])
        states[name] = state
    return scores, states


# ----------------------------------------------------------------------------- the grid


@dataclass
class Grid:
    data: dict[str, Merchant]
    spec: ScorerSpec
    record_spec: RecordSpec
    schedule: Schedule
    seeds: int
    methods: dict[str, Method] = field(default_factory=dict)
    timings: dict[str, list[float]] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def method(self, name: str, family: str, privacy: Privacy | None = None) -> Method:
        if name not in self.methods:
            self.methods[name] = Method(
                name,
                family,
                epsilon=None if privacy is None else privacy.epsilon,
                unit=None if privacy is None else privacy.unit.value,
            )
        return self.methods[name]

    def add_variants(
        self,
        label: str,
        family: str,
        weights: dict[str, Arrays],
        seed: int,
        seconds: float,
        privacy: Privacy | None,
        *,
        personalise: bool,
    ) -> None:
        began = time.perf_counter()
        shared = self.method(f"{label}", family, privacy)
        record(shared, shared_only(weights, self.spec, self.data), self.data)
        shared.seconds += seconds
        headed, _ = with_local_part(
            weights, self.spec, self.record_spec, self.data, seed, personalise=False
        )
        blend = self.method(f"{label} + local blend", family, privacy)
        record(blend, headed, self.data)
        blend.seconds += seconds + time.perf_counter() - began
        if personalise:
            began = time.perf_counter()
            ditto, states = with_local_part(
                weights, self.spec, self.record_spec, self.data, seed, personalise=True
            )
            full = self.method(f"{label} + personalised", family, privacy)
            record(full, ditto, self.data)
            full.seconds += seconds + time.perf_counter() - began
            kept = sum(1 for s in states.values() if s.personal)
            full.extra.setdefault("merchants keeping personal weights", []).append(kept)

    def run_central(self, seed: int) -> None:
        names = list(self.data)
        began = time.perf_counter()
        central = train_central(self.data, self.spec, self.record_spec, self.schedule, seed)
        took = time.perf_counter() - began
        self.add_variants(
            "model, centralised, non-private", "central",
            dict.fromkeys(names, central), seed, took, None, personalise=True,
        )  # fmt: skip
        self.log(f"seed {seed}: centralised {took:.0f}s")

    def run_privacy(self, seed: int, privacy: Privacy) -> None:
        """Local-only and federated training at one privacy setting, with their variants."""
        names = list(self.data)
        label = _label(privacy)
        began = time.perf_counter()
        local, spent = train_local(
            self.data, self.spec, self.record_spec, privacy, self.schedule, seed
        )
        took = time.perf_counter() - began
        self.add_variants(
            f"model, local-only, {label}", "local-only", local, seed, took, privacy,
            personalise=False,
        )  # fmt: skip
        self.log(f"seed {seed}: local-only {label} {took:.0f}s")
        began = time.perf_counter()
        timings: dict[str, list[float]] = {}
        kept: list[int] = []
        fed, spent = train_federated(
            self.data, self.spec, self.record_spec, privacy, self.schedule, seed, timings, kept
        )
        took = time.perf_counter() - began
        for name, values in timings.items():
            self.timings.setdefault(f"{label}|{name}", []).extend(values)
        self.add_variants(
            f"model, federated, {label}", "federated", dict.fromkeys(names, fed), seed,
            took, privacy, personalise=True,
        )  # fmt: skip
        method = self.methods[f"model, federated, {label}"]
        method.extra.setdefault("round kept", []).extend(kept)
        if privacy.epsilon is not None:
            method.extra.setdefault("epsilon per merchant", []).append(spent)
        self.log(f"seed {seed}: federated {label} {took:.0f}s")

    def merge(self, methods: dict[str, Method], timings: dict[str, list[float]]) -> None:
        """Fold one job's methods (other seeds or settings) into this grid."""
        for name, part in methods.items():
            into = self.methods.setdefault(name, part)
            if into is part:
                continue
            into.seeds.extend(part.seeds)
            into.sampled.extend(part.sampled)
            into.seconds += part.seconds
            for key, value in part.extra.items():
                if isinstance(value, list):
                    into.extra.setdefault(key, []).extend(value)
                else:
                    into.extra[key] = value
        for key, values in timings.items():
            self.timings.setdefault(key, []).extend(values)


# ----------------------------------------------------------------------------- jobs

Job = tuple[str, int, "Privacy | None"]
_WORKER: dict[str, object] = {}


def _start_worker(merchants: int, rounds: int, seeds: int, threads: int) -> None:
    torch.set_num_threads(threads)
    spec = ScorerSpec()
    data = dict(list(prepare(spec).items())[:merchants])
    _WORKER["grid"] = (data, spec, Schedule(rounds=rounds), seeds)


def _run_job(job: Job) -> tuple[dict[str, Method], dict[str, list[float]], float]:
    """One unit of the grid in a worker process: baselines, a seed's centralised model, or
    one seed's local-only and federated training at one privacy setting."""
    data, spec, schedule, seeds = _WORKER["grid"]  # type: ignore[misc]
    began = time.perf_counter()
    grid = Grid(data, spec, RecordSpec(), schedule, seeds, log=lambda s: print(s, flush=True))
    kind, seed, privacy = job
    if kind == "baselines":
        for method in run_baselines(data, seeds):
            grid.methods[method.name] = method
        print(f"baselines {time.perf_counter() - began:.0f}s", flush=True)
    elif kind == "central":
        grid.run_central(seed)
    else:
        assert privacy is not None
        grid.run_privacy(seed, privacy)
    return grid.methods, grid.timings, time.perf_counter() - began


def job_key(job: Job) -> str:
    kind, seed, privacy = job
    label = "" if privacy is None else "-" + _label(privacy).replace(" ", "_")
    return f"{kind}-seed{seed}{label}"


def plan_jobs(seeds: int, epsilons: tuple[float, ...], units: tuple[PrivacyUnit, ...]) -> list[Job]:
    """Every seed of what the targets rest on first (centralised, non-private, the default
    epsilon 3 at the event unit), then epsilon 3 at the customer unit, then the other
    epsilons: a run cut short still reports its headline on every seed."""
    headline = [Privacy(None), Privacy(3.0, PrivacyUnit.EVENT)]
    tiers = [
        [p for p in headline if p.epsilon is None or (p.epsilon in epsilons and p.unit in units)],
        [Privacy(3.0, u) for u in units if u is not PrivacyUnit.EVENT and 3.0 in epsilons],
        [Privacy(e, u) for u in units for e in epsilons if e != 3.0],
    ]
    jobs: list[Job] = [("baselines", 0, None)]
    jobs.extend(("central", seed, None) for seed in range(seeds))
    for tier in tiers:
        jobs.extend(("privacy", seed, p) for seed in range(seeds) for p in tier)
    return jobs


def _label(privacy: Privacy) -> str:
    if privacy.epsilon is None:
        return "non-private"
    return f"DP eps {privacy.epsilon:g} ({privacy.unit.value})"


# ----------------------------------------------------------------------------- summaries


def pooled(method: Method, metric: str) -> np.ndarray:
    """Per-case values averaged over seeds, all merchants in a fixed order."""
    names = sorted(method.seeds[0])
    return np.concatenate([np.nanmean([s[n][metric] for s in method.seeds], axis=0) for n in names])


def strata(method: Method) -> np.ndarray:
    names = sorted(method.seeds[0])
    return np.concatenate(
        [np.full(len(method.seeds[0][n]["ndcg@10"]), i) for i, n in enumerate(names)]
    )


def summarise(method: Method, rng: np.random.Generator) -> dict[str, object]:
    with warnings.catch_warnings():  # cases without a repeat (explore) item average to NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return _summarise(method, rng)


def _summarise(method: Method, rng: np.random.Generator) -> dict[str, object]:
    out: dict[str, object] = {"name": method.name, "family": method.family}
    groups = strata(method)
    for metric in (*REPORT_METRICS, "ndcg@10:repeat", "ndcg@10:explore"):
        values = pooled(method, metric)
        seed_means = [
            MetricSums.of({metric: np.concatenate([s[n][metric] for n in sorted(s)])}).mean(metric)
            for s in method.seeds
        ]
        low, high = bootstrap_ci(values, rng=rng, strata=groups)
        out[metric] = {
            "mean": float(np.nanmean(values)),
            "ci95": [low, high],
            "seed_std": float(np.std(seed_means)) if len(seed_means) > 1 else 0.0,
        }
    sampled = np.concatenate(
        [np.nanmean([s[n] for s in method.sampled], axis=0) for n in sorted(method.sampled[0])]
    )
    out["sampled-ndcg@10"] = float(np.nanmean(sampled))
    per_merchant = {}
    for name in sorted(method.seeds[0]):
        values = np.nanmean([s[name]["ndcg@10"] for s in method.seeds], axis=0)
        low, high = bootstrap_ci(values, rng=rng)
        per_merchant[name] = {"mean": float(np.nanmean(values)), "ci95": [low, high]}
    out["per_merchant_ndcg@10"] = per_merchant
    out["seconds"] = method.seconds
    out["seeds"] = len(method.seeds)
    out["epsilon"] = method.epsilon
    out["unit"] = method.unit
    out["extra"] = method.extra
    return out


def paired(a: Method, b: Method, merchant: str, rng: np.random.Generator) -> dict[str, float]:
    """Mean and bootstrap CI of a - b on one merchant's cases (NDCG@10, seed means)."""
    va = np.nanmean([s[merchant]["ndcg@10"] for s in a.seeds], axis=0)
    vb = np.nanmean([s[merchant]["ndcg@10"] for s in b.seeds], axis=0)
    low, high = bootstrap_ci(va - vb, rng=rng)
    return {"diff": float(np.nanmean(va - vb)), "ci95_low": low, "ci95_high": high}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=Schedule.rounds)
    parser.add_argument("--quick", action="store_true", help="eps 3, event unit, one seed")
    parser.add_argument("--merchants", type=int, default=10, help="first N stores (exploring)")
    parser.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "runs" / "quality-jobs",
        help="finished jobs are kept here, per model shape and schedule; a rerun skips them "
        "(delete it after a change to the code to start afresh)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the finished jobs"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    spec, record_spec = ScorerSpec(), RecordSpec()
    schedule = Schedule(rounds=args.rounds)
    data = dict(list(prepare(spec).items())[: args.merchants])
    print(f"prepared {len(data)} merchants in {time.perf_counter() - began:.0f}s", flush=True)
    seeds = 1 if args.quick else args.seeds
    epsilons, units = ((3.0,), (PrivacyUnit.EVENT,)) if args.quick else (EPSILONS, UNITS)
    jobs = plan_jobs(seeds, epsilons, units)
    grid = Grid(data, spec, record_spec, schedule, seeds, log=lambda s: print(s, flush=True))
    shape = hashlib.sha256(repr((spec, record_spec, schedule)).encode()).hexdigest()[:12]
    cache = args.cache / f"{args.merchants}-merchants-{args.rounds}-rounds-{shape}"
    cache.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not (cache / f"{job_key(job)}.pkl").exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already in {cache}", flush=True)
    if todo and not args.report_only:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=max(1, args.workers),
            mp_context=context,
            initializer=_start_worker,
            initargs=(args.merchants, args.rounds, seeds, 1),
        ) as pool:
            futures = {pool.submit(_run_job, job): job for job in todo}
            for done, future in enumerate(as_completed(futures), start=1):
                result = future.result()
                atomic_write_bytes(cache / f"{job_key(futures[future])}.pkl", pickle.dumps(result))
                at = time.perf_counter() - began
                print(f"[{done}/{len(todo)}] {result[2]:.0f}s (at {at:.0f}s)", flush=True)
    # Merged in the plan's order, not the order jobs finished in: the report's rows are the
    # same from run to run.
    job_seconds = 0.0
    for job in jobs:
        saved = cache / f"{job_key(job)}.pkl"
        if saved.exists():
            methods, timings, took = pickle.loads(saved.read_bytes())
            grid.merge(methods, timings)
            job_seconds += took
    missing = [job_key(j) for j in jobs if not (cache / f"{job_key(j)}.pkl").exists()]
    if missing:
        print(f"report from the finished jobs only; missing: {', '.join(missing)}", flush=True)
    report = Report(
        methods=grid.methods,
        summaries={
            n: summarise(m, numpy_stream(0, "bootstrap", n)) for n, m in grid.methods.items()
        },
        merchants=sorted(data),
        cases={n: len(m.held["test"].cases) for n, m in data.items()},
        full_ranking_seconds=time_full_ranking(data, spec),
        round_seconds=grid.timings,
        spec=spec,
        schedule=schedule,
        seconds=job_seconds,
        quick=args.quick,
        missing=missing,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(report, args.out, paired=paired)
    return 0


def time_full_ranking(data: dict[str, Merchant], spec: ScorerSpec) -> dict[str, float]:
    """Seconds for one full-ranking pass over each store's test households."""
    weights = initial(spec, 0)
    out = {}
    for name, m in data.items():
        began = time.perf_counter()
        held = m.held["test"]
        baselines.break_ties(raw_scores(weights, spec, held), held.popularity)
        out[name] = time.perf_counter() - began
    return out


if __name__ == "__main__":
    sys.exit(main())
