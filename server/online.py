"""The online loop: fine-tuning rounds on fresh inbox cohorts, versioned, gated, evaluated by
the merchants.

One step:
1. the merchants score the serving model on their newest inbox cohort before anything trains
   on it (prequential, ``fresh``) and, if the serving version was promoted over a parent, the
   serving and parent models on their held-out customers' newest events (``recent``); the
   serving version is rolled back if it now loses to its parent by more than
   ``rollback_tolerance``;
2. the serving model goes to every merchant as ``train.finetune``; merchants with a fresh cohort
   train on it (others refuse with a code);
3. with at least ``min_merchants`` updates, the aggregate is registered as a candidate (parent,
   round, merchants, each merchant's epsilon) and the merchants score candidate and serving model
   on their held-out customers' newest events; it is promoted only if no worse than the serving
   model by more than ``gate_tolerance``.
Every figure comes from federated evaluation (sums and counts); the platform holds no
evaluation data. Round numbers continue after the offline rounds and are persisted before each
round is sent, so a restart never reuses one (run id + round stays unique per release).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.serverapp import Grid

from common import protocol as P
from common.atomic import atomic_write_json
from common.config import RunConfig
from common.configparse import from_mapping, load_toml
from common.errors import ConfigError, StateError
from common.keys import generate_keypair, load_signing_key, load_verify_key
from common.ledger import ServerLedger
from common.nextbasket.spec import describe
from common.protocol import STALE_SUFFIX, EvalPart
from server.drift import DriftConfig, decide
from server.federated_evaluation import EvaluationOutcome
from server.federation import Federation, RoundOutcome, ServerSettings
from server.monitoring import EventLog, FedshopMetrics, MonitoringServer
from server.platform import run_platform, settings_from_run_config
from server.publish import Publisher, PublishReport, publish
from server.registry import ModelRegistry, ModelVersion, PromotionAction
from server.strategies import Strategy, build_strategy

log = logging.getLogger(__name__)

STATE_NAME = "online-state.json"
SERVING, PARENT, CANDIDATE = "serving", "parent", "candidate"
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class OnlineSettings:
    """How the platform runs online fine-tuning (``[online]`` in the online TOML)."""

    registry_dir: Path
    signing_key: Path  # platform Ed25519 key that signs model manifests
    verify_key: Path
    rounds_per_cohort: int = 1  # rounds one stream cohort may take part in (sigma is set for it)
    min_merchants: int = 2  # fresh-data trigger: fewer trained updates make no candidate
    gate_metric: str = "ndcg@10"
    gate_tolerance: float = 0.0  # > 0 lets small losses through, and they add up over weeks
    rollback_tolerance: float = 0.02
    interval_s: float = 3600.0  # deployment schedule between rounds (drift skips the wait)
    max_rounds: int = 0  # deployment: stop after this many online rounds (0 = run forever)
    monitoring_port: int = -1  # -1: no endpoint; 0: any free loopback port
    event_log: Path | None = None

    def __post_init__(self) -> None:
        if self.rounds_per_cohort < 1:
            raise ConfigError(
                f"online.rounds_per_cohort must be >= 1, got {self.rounds_per_cohort}"
            )
        if self.min_merchants < 1:
            raise ConfigError(f"online.min_merchants must be >= 1, got {self.min_merchants}")
        for name in ("gate_tolerance", "rollback_tolerance", "interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"online.{name} must be finite and >= 0, got {value!r}")
        if self.max_rounds < 0 or self.monitoring_port < -1:
            raise ConfigError(
                f"online.max_rounds must be >= 0 and monitoring_port >= -1, got "
                f"{self.max_rounds!r} and {self.monitoring_port!r}"
            )


def platform_keys(directory: Path) -> tuple[Path, Path]:
    """The platform's manifest-signing key pair in ``directory`` (created on first use)."""
    private, public = directory / "platform.key", directory / "platform.pub"
    if not private.exists():
        return generate_keypair(directory, name="platform")
    return private, public


def remaining_from_ledger(ledger: ServerLedger) -> dict[str, float]:
    """Cap minus spend of each merchant's latest release (its newest cohort at event level)."""
    out = {}
    for merchant in ledger.merchants():
        entries = ledger.entries(merchant)
        if entries:
            last = entries[-1].release
            out[merchant] = max(0.0, last.epsilon_cap - last.epsilon_after)
    return out


class OnlineRuntime(Protocol):
    """What the loop needs from the federation: fine-tuning rounds, federated evaluation,
    and each merchant's remaining epsilon."""

    def train(self, arrays: Arrays, rnd: int) -> RoundOutcome: ...

    def evaluate(
        self, models: dict[str, Arrays], tasks: tuple[tuple[EvalPart, str], ...], rnd: int
    ) -> EvaluationOutcome: ...

    def epsilon_remaining(self) -> dict[str, float]: ...

    def publish(self, publisher: Publisher, *, reason: str) -> PublishReport:
        """Send the serving version to every merchant (their serving mirrors)."""
        ...


class FederationRuntime:
    """:class:`OnlineRuntime` over a Flower Grid (simulation, deployment, or in-process)."""

    def __init__(
        self, federation: Federation, ledger: ServerLedger, *, rounds_per_cohort: int
    ) -> None:
        self.federation = federation
        self.ledger = ledger  # verified once, held for the loop's lifetime
        self.rounds_per_cohort = rounds_per_cohort

    def train(self, arrays: Arrays, rnd: int) -> RoundOutcome:
        return self.federation.run_round(
            arrays,
            rnd,
            self.ledger,
            message_type=P.FINETUNE,
            planned_rounds=self.rounds_per_cohort,
        )

    def evaluate(
        self, models: dict[str, Arrays], tasks: tuple[tuple[EvalPart, str], ...], rnd: int
    ) -> EvaluationOutcome:
        return self.federation.evaluate(models, tasks, rnd=rnd)

    def epsilon_remaining(self) -> dict[str, float]:
        return remaining_from_ledger(self.ledger)

    def publish(self, publisher: Publisher, *, reason: str) -> PublishReport:
        settings = self.federation.settings
        return publish(
            self.federation.grid,
            publisher,
            reason=reason,
            timeout_s=self.federation.config.federation.round_timeout_s,
            simulation_dir=settings.simulation_dir,
        )


@dataclass(frozen=True)
class StepResult:
    """What one online round did; one row of ``online.json``."""

    round: int
    trigger: str
    trained: tuple[str, ...]
    refused: Mapping[str, str]
    failed: Mapping[str, str]
    candidate: int | None
    promoted: bool
    serving_before: int
    serving: int
    reason: str
    prequential: Mapping[str, float] = field(default_factory=dict)
    prequential_cases: float = 0.0
    references: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    rollback: str | None = None
    candidate_metrics: Mapping[str, float] = field(default_factory=dict)
    serving_metrics: Mapping[str, float] = field(default_factory=dict)
    epsilon_remaining: Mapping[str, float] = field(default_factory=dict)
    drift: str = ""
    drift_trigger: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.__dict__.items()}


def _json_ready(value: Any) -> Any:
    """Plain JSON for the event log: a metric no case defined this round (e.g. explore items
    in a week without any) is ``None``, not NaN."""
    if isinstance(value, Mapping):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class OnlineLoop:
    """Registry, gate, rollback, drift and metrics around an :class:`OnlineRuntime`."""

    def __init__(
        self,
        *,
        config: RunConfig,
        settings: OnlineSettings,
        runtime: OnlineRuntime,
        metrics: FedshopMetrics | None = None,
        events: EventLog | None = None,
        drift: DriftConfig | None = None,
        references: Mapping[str, Arrays] | None = None,
    ) -> None:
        """``references``: fixed models the merchants also score on every fresh cohort (with
        current and with stale histories), e.g. the offline model as a benchmark's bar."""
        self.config = config
        self.references = dict(references or {})
        self.settings = settings
        self.runtime = runtime
        signing_key = load_signing_key(settings.signing_key)
        self.registry = ModelRegistry(
            settings.registry_dir,
            signing_key=signing_key,
            verify_key=load_verify_key(settings.verify_key),
        )
        # Every change of the serving version goes to the merchants, who serve it themselves.
        self.publisher = Publisher(self.registry, signing_key, model=describe(config.model))
        self.strategy: Strategy = build_strategy(config.federation)
        self.metrics = metrics or FedshopMetrics()
        self.events = events or EventLog(
            settings.event_log or settings.registry_dir / "events.jsonl"
        )
        self.drift_config = drift or DriftConfig()
        self._state_path = settings.registry_dir / STATE_NAME
        self._state = self._load_state()

    # -- persisted state ---------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        import json

        if self._state_path.exists():
            state: dict[str, Any] = json.loads(self._state_path.read_text())
            return state
        return {"next_round": 0, "errors": {}, "seen": {}}

    def _save_state(self) -> None:
        atomic_write_json(self._state_path, self._state)

    def next_round(self, first: int) -> int:
        """The next unused round number, never below ``first`` (the round after offline)."""
        return max(int(self._state["next_round"]), first)

    # -- versions ----------------------------------------------------------------
    def bootstrap(
        self, arrays: Arrays, *, round: int, metrics: Mapping[str, float]
    ) -> ModelVersion:
        """Register and promote the offline model, unless a version already serves (restart)."""
        serving = self.registry.promoted()
        if serving is not None:
            log.info("online: version %d already serves; continuing", serving.id)
            return serving
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        version = self.registry.register(
            arrays, parent=None, round=round, merchants=(), metrics=finite, privacy={}
        )
        self.registry.promote(version.id, reason="offline model: start of online fine-tuning")
        self.metrics.promoted(version.id)
        self.events.emit("online_bootstrap", version=version.id, round=round)
        self._publish(f"version {version.id}: the offline model starts serving")
        return version

    def _publish(self, reason: str) -> None:
        report = self.runtime.publish(self.publisher, reason=reason)
        self.events.emit(
            "publication",
            serial=report.serial,
            installed=dict(report.installed),
            refused=dict(report.refused),
            failed=dict(report.failed),
        )

    def serving(self) -> tuple[ModelVersion, Arrays]:
        version = self.registry.promoted()
        if version is None:
            raise StateError("no model version serves yet: bootstrap the online loop first")
        return version, self.registry.load_arrays(version.id)

    def _rollback_parent(self) -> ModelVersion | None:
        """The serving version's parent, if the serving version got there by a promotion."""
        history = self.registry.history()
        if not history or history[-1].action is not PromotionAction.PROMOTE or len(history) < 2:
            return None
        serving = self.registry.promoted()
        if serving is None or serving.parent is None:
            return None
        return self.registry.get(serving.parent)

    def _check_rollback(self, recent: EvaluationOutcome, serving: ModelVersion) -> str | None:
        metric = self.settings.gate_metric
        now = recent.means(EvalPart.RECENT, SERVING).get(metric, math.nan)
        before = recent.means(EvalPart.RECENT, PARENT).get(metric, math.nan)
        if not (math.isfinite(now) and math.isfinite(before)):
            return None
        if before - now <= self.settings.rollback_tolerance:
            return None
        reason = (
            f"version {serving.id} {metric}={now:.4f} on newer data vs {before:.4f} for the "
            f"version it replaced (tolerance {self.settings.rollback_tolerance:g})"
        )
        restored = self.registry.rollback(reason=reason)
        self.metrics.promoted(restored.id)
        self.events.emit("rollback", version=restored.id, replaced=serving.id, reason=reason)
        self._publish(f"rollback to version {restored.id}: {reason}")
        return reason

    # -- one round ---------------------------------------------------------------
    def step(self, *, first_round: int, trigger: str) -> StepResult:
        """One online round: prequential and rollback check, fine-tuning, gate."""
        began = time.perf_counter()
        rnd = self.next_round(first_round)
        self._state["next_round"] = rnd + 1
        self._save_state()  # before sending: a crash never reuses this round number
        serving, arrays = self.serving()
        serving_before = serving.id
        parent = self._rollback_parent()
        models: dict[str, Arrays] = {SERVING: arrays, **self.references}
        tasks: list[tuple[EvalPart, str]] = [(EvalPart.FRESH, SERVING)]
        for label in self.references:
            tasks += [(EvalPart.FRESH, label), (EvalPart.FRESH, label + STALE_SUFFIX)]
        if parent is not None:
            models[PARENT] = self.registry.load_arrays(parent.id)
            tasks += [(EvalPart.RECENT, SERVING), (EvalPart.RECENT, PARENT)]
        before = self.runtime.evaluate(models, tuple(tasks), rnd)
        rollback = self._check_rollback(before, serving) if parent is not None else None
        if rollback is not None:
            serving, arrays = self.serving()
        outcome = self.runtime.train(arrays, rnd)
        self._record_outcome(outcome)
        remaining = self.runtime.epsilon_remaining()
        for merchant, value in remaining.items():
            self.metrics.epsilon_remaining(merchant, value)
        drift_trigger, drift_reason = self._drift(before)
        base: dict[str, Any] = {
            "round": rnd,
            "trigger": trigger,
            "trained": tuple(sorted(u.merchant_id for u in outcome.updates)),
            "refused": dict(outcome.refused),
            "failed": dict(outcome.failed),
            "serving_before": serving_before,
            "prequential": before.means(EvalPart.FRESH, SERVING),
            "prequential_cases": before.cases(EvalPart.FRESH, SERVING),
            "references": {
                label: before.means(EvalPart.FRESH, label)
                for label in [*self.references, *(r + STALE_SUFFIX for r in self.references)]
            },
            "rollback": rollback,
            "epsilon_remaining": remaining,
            "drift": drift_reason,
            "drift_trigger": drift_trigger,
        }
        if len(outcome.updates) < self.settings.min_merchants:
            result = StepResult(
                **base,
                candidate=None,
                promoted=False,
                serving=serving.id,
                reason=f"only {len(outcome.updates)} merchant(s) had fresh data "
                f"(< {self.settings.min_merchants}): no candidate",
                seconds=time.perf_counter() - began,
            )
        else:
            result = self._candidate(base, serving, arrays, outcome, rnd, began)
        self.metrics.round_finished(
            duration_seconds=result.seconds, merchants_active=len(result.trained)
        )
        self.events.emit("online_round", **_json_ready(result.to_dict()))
        return result

    def _record_outcome(self, outcome: RoundOutcome) -> None:
        for merchant, code in outcome.refusal_codes.items():
            self.metrics.refusal(merchant, code or "unknown")
        for code in outcome.failure_codes.values():
            self.metrics.rejected_update(code or "unknown")

    def _drift(self, before: EvaluationOutcome) -> tuple[bool, str]:
        """Drift on each merchant's prequential error (1 - gate metric on its fresh cohort)."""
        errors: dict[str, list[float]] = self._state["errors"]
        metric = self.settings.gate_metric
        for merchant, means in before.per_merchant(EvalPart.FRESH, SERVING).items():
            value = means.get(metric, math.nan)
            if math.isfinite(value):
                errors.setdefault(merchant, []).append(1.0 - float(value))
        decision = decide(errors, seen=self._state["seen"], config=self.drift_config)
        if decision.trigger:
            self._state["seen"] = {m: len(v) for m, v in errors.items()}
        self._save_state()
        return decision.trigger, decision.reason

    def _candidate(
        self,
        base: dict[str, Any],
        serving: ModelVersion,
        arrays: Arrays,
        outcome: RoundOutcome,
        rnd: int,
        began: float,
    ) -> StepResult:
        candidate = self.strategy.aggregate(arrays, outcome.updates)
        gate = self.runtime.evaluate(
            {CANDIDATE: candidate, SERVING: arrays},
            ((EvalPart.RECENT, CANDIDATE), (EvalPart.RECENT, SERVING)),
            rnd,
        )
        cand_metrics = gate.means(EvalPart.RECENT, CANDIDATE)
        serv_metrics = gate.means(EvalPart.RECENT, SERVING)
        contributors = [u.merchant_id for u in outcome.updates]
        privacy = {m: outcome.epsilon[m] for m in contributors if m in outcome.epsilon}
        if not self.config.privacy.enabled:
            privacy = {m: 0.0 for m in contributors}  # a non-private baseline: nothing spent
        version = self.registry.register(
            candidate,
            parent=serving.id,
            round=base["round"],
            merchants=contributors,
            metrics={
                **{k: v for k, v in cand_metrics.items() if math.isfinite(v)},
                **{f"serving_{k}": v for k, v in serv_metrics.items() if math.isfinite(v)},
            },
            privacy=privacy,
        )
        decision = self.registry.gate_candidate(
            version.id,
            current_metrics=serv_metrics,
            metric=self.settings.gate_metric,
            tolerance=self.settings.gate_tolerance,
        )
        self.events.emit(
            "gate", candidate=version.id, promoted=decision.promote, reason=decision.reason
        )
        if decision.promote:
            self.metrics.promoted(version.id)
            self._publish(f"version {version.id} promoted: {decision.reason}")
        return StepResult(
            **base,
            candidate=version.id,
            promoted=decision.promote,
            serving=version.id if decision.promote else serving.id,
            reason=decision.reason,
            candidate_metrics=cand_metrics,
            serving_metrics=serv_metrics,
            seconds=time.perf_counter() - began,
        )


# -- deployment ----------------------------------------------------------------------


def online_settings(run_dir: Path, path: Path | None = None) -> OnlineSettings:
    """Settings from ``[online]`` of ``path`` (optional); keys default into ``run_dir``."""
    table: dict[str, Any] = {}
    if path is not None:
        data = load_toml(path)
        unknown = set(data) - {"online"}
        if unknown:
            raise ConfigError(f"{path}: only an [online] table is allowed, found {sorted(unknown)}")
        table = dict(data.get("online", {}))
    if "signing_key" not in table:
        private, public = platform_keys(run_dir / "server")
        table.update(signing_key=str(private), verify_key=str(public))
    table.setdefault("registry_dir", str(run_dir / "registry"))
    return from_mapping(OnlineSettings, table, prefix="online")


def run_online(
    grid: Grid,
    server: ServerSettings,
    online: OnlineSettings,
    *,
    rounds: int,
    before_step: Callable[[int], str] | None = None,
    metrics: FedshopMetrics | None = None,
    sleep: Callable[[float], None] = time.sleep,
    reference_offline: bool = False,
) -> tuple[dict[str, Any], list[StepResult]]:
    """Offline rounds (resumable), then ``rounds`` online steps (0 = forever).

    ``before_step(i)`` runs before step ``i`` and returns its trigger label (the simulation
    drops that week's events into the merchants' inboxes there); otherwise steps follow the
    schedule, and a drift alarm skips the wait."""
    server.ledger_path.parent.mkdir(parents=True, exist_ok=True)
    with ServerLedger.open(server.ledger_path) as ledger:
        offline = run_platform(grid, server, ledger)
        if not offline.completed or offline.arrays is None:
            raise StateError("offline rounds did not complete; online fine-tuning not started")
        federation = Federation(grid, server)
        loop = OnlineLoop(
            config=server.config,
            settings=online,
            runtime=FederationRuntime(
                federation, ledger, rounds_per_cohort=online.rounds_per_cohort
            ),
            metrics=metrics,
            references={"offline": offline.arrays} if reference_offline else None,
        )
        loop.bootstrap(
            offline.arrays,
            round=server.config.federation.rounds,
            metrics=offline.summary.get("test", {}),
        )
        results: list[StepResult] = []
        trigger = "schedule"
        while rounds == 0 or len(results) < rounds:
            if before_step is not None:
                trigger = before_step(len(results))
            result = loop.step(first_round=server.config.federation.rounds + 1, trigger=trigger)
            results.append(result)
            log.info("online round %d: %s", result.round, result.reason)
            if before_step is None:
                trigger = "drift" if result.drift_trigger else "schedule"
                if rounds == 0 or len(results) < rounds:
                    sleep(0.0 if result.drift_trigger else online.interval_s)
    return offline.summary, results


def run_online_deployment(
    grid: Grid,
    server: ServerSettings,
    online: OnlineSettings,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> list[StepResult]:
    """The deployed loop with its monitoring endpoint."""
    metrics = FedshopMetrics()
    monitor = None
    if online.monitoring_port >= 0:
        registry_version = _serving_version_reader(online)
        monitor = MonitoringServer(
            metrics.store,
            port=online.monitoring_port,
            health=lambda: {"serving_version": registry_version()},
        ).start()
        log.info("monitoring on http://127.0.0.1:%d/metrics", monitor.port)
    try:
        _, results = run_online(
            grid, server, online, rounds=online.max_rounds, metrics=metrics, sleep=sleep
        )
    finally:
        if monitor is not None:
            monitor.stop()
    return results


def _serving_version_reader(online: OnlineSettings) -> Callable[[], int | None]:
    def read() -> int | None:
        registry = ModelRegistry(
            online.registry_dir,
            signing_key=load_signing_key(online.signing_key),
            verify_key=load_verify_key(online.verify_key),
        )
        version = registry.promoted()
        return None if version is None else version.id

    return read


def run_online_from_run_config(grid: Grid, run_config: Mapping[str, Any]) -> list[StepResult]:
    """The deployed ServerApp's entry point when run config ``online`` is true."""
    server = settings_from_run_config(dict(run_config))
    server.run_dir.mkdir(parents=True, exist_ok=True)
    path = str(run_config.get("online-config", "") or "")
    return run_online_deployment(
        grid, server, online_settings(server.run_dir, Path(path) if path else None)
    )


def online_enabled(run_config: Mapping[str, Any]) -> bool:
    return str(run_config.get("online", "")).strip().lower() in ("1", "true", "yes")
