"""The online loop: fine-tuning rounds on fresh inbox cohorts, versioned and gated.

One step: send the serving model to every merchant as ``train.finetune``; merchants with a fresh
cohort train on it (others refuse, saying why); if at least ``min_merchants`` updates arrive
they are aggregated into a candidate, registered (parent, round, merchants, metrics, each
merchant's epsilon) and compared with the serving model on the platform's held-out recent data.
The candidate is promoted only if it is no worse than the serving model by more than
``gate_tolerance`` on that same data. Before a step, :meth:`OnlineLoop.check_rollback` compares
the serving model with the one it replaced on newer data and rolls back if it lost by more than
``rollback_tolerance``. Round numbers continue after the offline rounds and are persisted before
each round is sent, so a restart never reuses one (run id + round stays unique per release).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from common import protocol as P
from common.arrays_io import npz_to_arrays
from common.atomic import atomic_write_bytes
from common.config import RunConfig
from common.configparse import from_mapping, load_toml
from common.errors import ConfigError, StateError
from common.keys import generate_keypair, load_signing_key, load_verify_key
from common.ledger import ServerLedger
from common.model import Recommender, load_state_arrays
from server.drift import DriftConfig, decide
from server.evaluation_set import EvaluationSet
from server.federation import Federation, RoundOutcome, ServerSettings
from server.monitoring import EventLog, FedshopMetrics, MonitoringServer
from server.registry import ModelRegistry, ModelVersion, PromotionAction
from server.strategies import Strategy, build_strategy

log = logging.getLogger(__name__)

FINETUNE_MESSAGE_TYPE = "train.finetune"  # the ClientApp action in client/finetune.py
STATE_NAME = "online-state.json"
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


class RoundRunner(Protocol):
    """Runs one fine-tuning round and knows each merchant's remaining epsilon."""

    def run(self, arrays: Arrays, rnd: int) -> RoundOutcome: ...

    def epsilon_remaining(self) -> dict[str, float]: ...


def remaining_from_ledger(ledger: ServerLedger) -> dict[str, float]:
    """Cap minus spend of each merchant's latest release (its newest cohort at event level)."""
    out = {}
    for merchant in ledger.merchants():
        entries = ledger.entries(merchant)
        if entries:
            last = entries[-1].release
            out[merchant] = max(0.0, last.epsilon_cap - last.epsilon_after)
    return out


class OnlineFederation(Federation):
    """The offline federation's round, with planned rounds set to the rounds per cohort."""

    def __init__(self, grid: Grid, settings: ServerSettings, *, rounds_per_cohort: int) -> None:
        super().__init__(grid, settings)
        self.rounds_per_cohort = rounds_per_cohort

    def _messages(
        self, arrays: Arrays, rnd: int, nodes: list[int], message_type: str
    ) -> list[Message]:
        messages = super()._messages(arrays, rnd, nodes, message_type)
        for message in messages:
            config = message.content[P.CONFIG]
            assert isinstance(config, ConfigRecord)
            config[P.PLANNED_ROUNDS] = self.rounds_per_cohort
        return messages


class FederationRunner:
    """:class:`RoundRunner` over Flower's Grid (simulation or deployment)."""

    def __init__(self, grid: Grid, settings: ServerSettings, *, rounds_per_cohort: int) -> None:
        self.federation = OnlineFederation(grid, settings, rounds_per_cohort=rounds_per_cohort)
        self.ledger_path = settings.ledger_path

    def run(self, arrays: Arrays, rnd: int) -> RoundOutcome:
        with ServerLedger.open(self.ledger_path) as ledger:
            return self.federation.run_round(
                arrays, rnd, ledger, message_type=FINETUNE_MESSAGE_TYPE
            )

    def epsilon_remaining(self) -> dict[str, float]:
        with ServerLedger.open(self.ledger_path) as ledger:
            return remaining_from_ledger(ledger)


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
    serving: int
    reason: str
    candidate_metrics: Mapping[str, float] = field(default_factory=dict)
    serving_metrics: Mapping[str, float] = field(default_factory=dict)
    epsilon_remaining: Mapping[str, float] = field(default_factory=dict)
    drift: str = ""
    drift_trigger: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.__dict__.items()}


class OnlineLoop:
    """Registry, gate, rollback, drift and metrics around a :class:`RoundRunner`."""

    def __init__(
        self,
        *,
        config: RunConfig,
        settings: OnlineSettings,
        runner: RoundRunner,
        metrics: FedshopMetrics | None = None,
        events: EventLog | None = None,
        drift: DriftConfig | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.runner = runner
        self.registry = ModelRegistry(
            settings.registry_dir,
            signing_key=load_signing_key(settings.signing_key),
            verify_key=load_verify_key(settings.verify_key),
        )
        self.strategy: Strategy = build_strategy(config.federation)
        self.model = Recommender(config.model)
        self.metrics = metrics or FedshopMetrics()
        self.events = events or EventLog(
            settings.event_log or settings.registry_dir / "events.jsonl"
        )
        self.drift_config = drift or DriftConfig()
        self._state_path = settings.registry_dir / STATE_NAME
        self._state = self._load_state()

    # -- persisted state ---------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        if self._state_path.exists():
            state: dict[str, Any] = json.loads(self._state_path.read_text())
            return state
        return {"next_round": 0, "losses": {}, "seen": {}}

    def _save_state(self) -> None:
        atomic_write_bytes(self._state_path, json.dumps(self._state, indent=1).encode())

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
        return version

    def serving(self) -> tuple[ModelVersion, Arrays]:
        version = self.registry.promoted()
        if version is None:
            raise ConfigError("no model version serves yet: bootstrap the online loop first")
        return version, self.registry.load_arrays(version.id)

    def evaluate(self, arrays: Mapping[str, np.ndarray], evaluation: EvaluationSet) -> dict:
        load_state_arrays(self.model, dict(arrays))
        overall, _ = evaluation.evaluate(self.model)
        return overall

    # -- rollback ----------------------------------------------------------------
    def check_rollback(self, recent: EvaluationSet | None) -> str | None:
        """Roll back if the serving model now loses to the one it replaced on ``recent``."""
        history = self.registry.history()
        if recent is None or not history or history[-1].action is not PromotionAction.PROMOTE:
            return None
        serving, arrays = self.serving()
        if serving.parent is None or len(history) < 2:
            return None
        metric = self.settings.gate_metric
        now = self.evaluate(arrays, recent).get(metric, math.nan)
        before = self.evaluate(self.registry.load_arrays(serving.parent), recent).get(
            metric, math.nan
        )
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
        return reason

    # -- one round ---------------------------------------------------------------
    def step(self, gate_set: EvaluationSet | None, *, first_round: int, trigger: str) -> StepResult:
        """Run one fine-tuning round; register, gate and maybe promote its candidate."""
        began = time.perf_counter()
        rnd = self.next_round(first_round)
        self._state["next_round"] = rnd + 1
        self._save_state()  # before sending: a crash never reuses this round number
        serving, arrays = self.serving()
        outcome = self.runner.run(arrays, rnd)
        self._record_outcome(outcome)
        remaining = self.runner.epsilon_remaining()
        for merchant, value in remaining.items():
            self.metrics.epsilon_remaining(merchant, value)
        drift_trigger, drift_reason = self._drift(outcome)
        base = {
            "round": rnd,
            "trigger": trigger,
            "trained": tuple(sorted(u.merchant_id for u in outcome.updates)),
            "refused": dict(outcome.refused),
            "failed": dict(outcome.failed),
            "epsilon_remaining": remaining,
            "drift": drift_reason,
            "drift_trigger": drift_trigger,
        }
        if len(outcome.updates) < self.settings.min_merchants:
            reason = (
                f"only {len(outcome.updates)} merchant(s) had fresh data "
                f"(< {self.settings.min_merchants}): no candidate"
            )
            result = StepResult(
                **base,  # type: ignore[arg-type]
                candidate=None,
                promoted=False,
                serving=serving.id,
                reason=reason,
                seconds=time.perf_counter() - began,
            )
        else:
            result = self._candidate(base, serving, arrays, outcome, gate_set, began)
        self.metrics.round_finished(
            duration_seconds=result.seconds, merchants_active=len(result.trained)
        )
        self.events.emit("online_round", **result.to_dict())
        return result

    def _record_outcome(self, outcome: RoundOutcome) -> None:
        for merchant, reason in outcome.refused.items():
            kind = "no-fresh-data" if reason.startswith("no fresh data") else "budget"
            self.metrics.refusal(merchant, kind)
        for _merchant, reason in outcome.failed.items():
            self.metrics.rejected_update(reason.split(":")[0][:60] or "failed")

    def _drift(self, outcome: RoundOutcome) -> tuple[bool, str]:
        losses: dict[str, list[float]] = self._state["losses"]
        for merchant, loss in outcome.losses.items():
            if math.isfinite(loss):
                losses.setdefault(merchant, []).append(float(loss))
        decision = decide(losses, seen=self._state["seen"], config=self.drift_config)
        if decision.trigger:
            self._state["seen"] = {m: len(v) for m, v in losses.items()}
        self._save_state()
        return decision.trigger, decision.reason

    def _candidate(
        self,
        base: dict[str, Any],
        serving: ModelVersion,
        arrays: Arrays,
        outcome: RoundOutcome,
        gate_set: EvaluationSet | None,
        began: float,
    ) -> StepResult:
        candidate = self.strategy.aggregate(arrays, outcome.updates)
        cand_metrics = {} if gate_set is None else self.evaluate(candidate, gate_set)
        serv_metrics = {} if gate_set is None else self.evaluate(arrays, gate_set)
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
        if decision.promote:
            self.metrics.promoted(version.id)
        self.events.emit(
            "gate", candidate=version.id, promoted=decision.promote, reason=decision.reason
        )
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


def _final_arrays(run_dir: Path) -> Arrays:
    return npz_to_arrays((run_dir / "model" / "final.npz").read_bytes())


def run_online_deployment(
    grid: Grid,
    server: ServerSettings,
    online: OnlineSettings,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> list[StepResult]:
    """Offline rounds (resumable), then fine-tuning rounds on a schedule, forever or
    ``max_rounds`` times. The gate uses the platform's validation archive, re-read every round
    so an operator can refresh it with recent held-out data."""
    from server.app import run_platform  # server.app may import this module

    summary = run_platform(grid, server)
    if not summary.get("completed"):
        raise StateError("offline rounds did not complete; online fine-tuning not started")
    metrics = FedshopMetrics()
    loop = OnlineLoop(
        config=server.config,
        settings=online,
        runner=FederationRunner(grid, server, rounds_per_cohort=online.rounds_per_cohort),
        metrics=metrics,
    )
    loop.bootstrap(
        _final_arrays(server.run_dir),
        round=server.config.federation.rounds,
        metrics=summary.get("test", {}),
    )
    monitor = None
    if online.monitoring_port >= 0:
        monitor = MonitoringServer(
            metrics.store,
            port=online.monitoring_port,
            health=lambda: {"serving_version": loop.serving()[0].id},
        ).start()
        log.info("monitoring on http://127.0.0.1:%d/metrics", monitor.port)
    results: list[StepResult] = []
    try:
        trigger = "schedule"
        while online.max_rounds == 0 or len(results) < online.max_rounds:
            recent = EvaluationSet.load(server.validation_set) if server.validation_set else None
            loop.check_rollback(recent)
            result = loop.step(
                recent, first_round=server.config.federation.rounds + 1, trigger=trigger
            )
            results.append(result)
            log.info("online round %d: %s", result.round, result.reason)
            trigger = "drift" if result.drift_trigger else "schedule"
            if online.max_rounds == 0 or len(results) < online.max_rounds:
                sleep(0.0 if result.drift_trigger else online.interval_s)
    finally:
        if monitor is not None:
            monitor.stop()
    return results


def run_online_from_run_config(grid: Grid, run_config: Mapping[str, Any]) -> list[StepResult]:
    """The deployed ServerApp's entry point when run config ``online`` is true."""
    from server.app import settings_from_run_config

    server = settings_from_run_config(dict(run_config))
    server.run_dir.mkdir(parents=True, exist_ok=True)
    path = str(run_config.get("online-config", "") or "")
    return run_online_deployment(
        grid, server, online_settings(server.run_dir, Path(path) if path else None)
    )


def online_enabled(run_config: Mapping[str, Any]) -> bool:
    return str(run_config.get("online", "")).strip().lower() in ("1", "true", "yes")
