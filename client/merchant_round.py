"""One merchant round, independent of Flower's message types.

Order of operations is the privacy contract: check the budget, train, write the released
weights to the outbox, append the signed release to the ledger, and only then hand the
weights back for sending. A crash after the ledger append leaves the spend counted; a second
request for the same run and round re-sends the stored weights instead of spending again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from client.data import PreparedData, prepared_data
from client.merchant import MerchantConfig
from client.training import DPSettings, LocalTraining, RoundResult, steps_per_round, train_round
from common.accounting import MechanismStep, PrivacyUnit, epsilon_spent, noise_for_target
from common.arrays_io import arrays_to_npz, npz_to_arrays
from common.atomic import atomic_write_bytes
from common.config import RunConfig
from common.errors import (
    ConfigError,
    FedshopError,
    IntegrityError,
    PrivacyBudgetExceededError,
    TrainingError,
)
from common.features import training_records
from common.keys import load_signing_key
from common.ledger import LedgerEntry, MerchantLedger, PrivacyRelease
from common.model import Recommender, arrays_sha256, load_state_arrays
from common.protocol import Outcome
from common.rng import numpy_stream, torch_stream

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "opacus", "flwr", "numpy", "fedshop")


@dataclass(frozen=True)
class TrainRequest:
    run_id: str
    round: int
    planned_rounds: int
    seed: int
    model_in_sha256: str
    config: RunConfig
    arrays: dict[str, np.ndarray]
    server_seqs: dict[str, int] = field(default_factory=dict)  # what the platform's ledger holds


@dataclass(frozen=True)
class TrainReply:
    outcome: Outcome
    merchant_id: str
    reason: str = ""
    arrays: dict[str, np.ndarray] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    ledger_entry: str | None = None
    ledger_backlog: tuple[str, ...] = ()  # entries released earlier that the platform lacks


@dataclass(frozen=True)
class RoundPlan:
    """The mechanism a round will run and the epsilon the cohort reaches if it does."""

    mechanism: MechanismStep
    delta: float
    cap: float
    epsilon_after: float
    records: int


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _budget_history(ledger: MerchantLedger, merchant: MerchantConfig) -> list[LedgerEntry]:
    """Event-level spend composes per cohort; a customer's spend composes across all cohorts."""
    entries = ledger.entries()
    if merchant.privacy_unit is PrivacyUnit.CUSTOMER:
        return entries
    return [e for e in entries if e.release.cohort == merchant.cohort]


def plan_round(
    request: TrainRequest, merchant: MerchantConfig, data: PreparedData, spent: list[LedgerEntry]
) -> RoundPlan:
    """Choose sigma and project epsilon; raise PrivacyBudgetExceededError past the cap."""
    privacy = request.config.privacy
    unit = merchant.privacy_unit
    records = data.customers if unit is PrivacyUnit.CUSTOMER else len(data.encoded)
    delta = min(merchant.delta, privacy.delta, 1.0 / (10 * records))
    cap = min(merchant.epsilon_cap, privacy.epsilon_cap)
    settings = LocalTraining(
        batch_size=request.config.training.batch_size,
        local_epochs=request.config.training.local_epochs,
    )
    q, steps = steps_per_round(records, settings)
    history = [
        MechanismStep(e.release.noise_multiplier, e.release.sample_rate, e.release.steps)
        for e in spent
    ]
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    else:
        before_run = [
            h for h, e in zip(history, spent, strict=True) if e.release.run_id != request.run_id
        ]
        try:
            sigma = noise_for_target(
                target_epsilon=cap,
                delta=delta,
                sample_rate=q,
                steps=steps * request.planned_rounds,
                prior=before_run,
                max_noise_multiplier=merchant.max_noise_multiplier,
            )
        except ConfigError as exc:
            raise PrivacyBudgetExceededError(f"merchant {merchant.id}: {exc}") from None
    mechanism = MechanismStep(sigma, q, steps)
    epsilon_after = epsilon_spent([*history, mechanism], delta=delta)
    if epsilon_after > cap * (1 + 1e-9):
        raise PrivacyBudgetExceededError(
            f"merchant {merchant.id}: round {request.round} would reach epsilon "
            f"{epsilon_after:.3f} > cap {cap:g} (cohort {merchant.cohort!r}, "
            f"spent {epsilon_spent(history, delta=delta):.3f})"
        )
    return RoundPlan(
        mechanism=mechanism, delta=delta, cap=cap, epsilon_after=epsilon_after, records=records
    )


def _outbox_file(merchant: MerchantConfig, request: TrainRequest) -> Path:
    return merchant.outbox / f"{request.run_id}-round{request.round:04d}.npz"


def _write_outbox(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write_bytes(path, arrays_to_npz(arrays))


def _read_outbox(path: Path) -> dict[str, np.ndarray]:
    return npz_to_arrays(path.read_bytes())


def _device(merchant: MerchantConfig) -> torch.device:
    if merchant.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(merchant.device)


def _replay(
    request: TrainRequest, merchant: MerchantConfig, entry: LedgerEntry, ledger: MerchantLedger
) -> TrainReply | None:
    """Re-send a release already in the ledger (same run, round and input model)."""
    path = _outbox_file(merchant, request)
    if entry.release.model_in_sha256 != request.model_in_sha256 or not path.exists():
        return None
    arrays = _read_outbox(path)
    if arrays_sha256(arrays) != entry.release.model_out_sha256:
        return None
    log.info("merchant %s: round %d already released; re-sending it", merchant.id, request.round)
    return TrainReply(
        Outcome.TRAINED,
        merchant.id,
        "re-sent",
        arrays,
        {
            "epsilon": entry.release.epsilon_after,
            "epsilon-cap": entry.release.epsilon_cap,
            "num-examples": float(entry.release.dataset_size),
        },
        entry.to_wire(),
        _backlog(ledger, request, merchant, entry),
    )


def _backlog(
    ledger: MerchantLedger, request: TrainRequest, merchant: MerchantConfig, entry: LedgerEntry
) -> tuple[str, ...]:
    """Earlier releases the platform has not recorded (e.g. the merchant crashed after its
    ledger append but before sending): they travel with this one so the chains stay whole."""
    known = request.server_seqs.get(merchant.id, 0)
    return tuple(e.to_wire() for e in ledger.entries_after(known) if e.seq < entry.seq)


def run_merchant_round(request: TrainRequest, merchant: MerchantConfig) -> TrainReply:
    """Train one round or refuse; never raises for expected failures."""
    try:
        return _run(request, merchant)
    except PrivacyBudgetExceededError as exc:
        log.warning("%s", exc)
        return TrainReply(Outcome.REFUSED, merchant.id, str(exc))
    except FedshopError as exc:
        log.error("merchant %s failed: %s", merchant.id, exc.one_line())
        return TrainReply(Outcome.FAILED, merchant.id, exc.one_line())


def _run(request: TrainRequest, merchant: MerchantConfig) -> TrainReply:
    if arrays_sha256(request.arrays) != request.model_in_sha256:
        raise IntegrityError("received model does not match its announced hash")
    config = request.config
    torch.set_num_threads(merchant.threads)
    data = prepared_data(merchant.data, config.model)
    merchant.state_dir.mkdir(parents=True, exist_ok=True)
    if not config.privacy.enabled:
        return _run_non_private(request, merchant, data)
    with MerchantLedger.open(
        merchant.ledger_path,
        merchant_id=merchant.id,
        signing_key=load_signing_key(merchant.signing_key),
    ) as ledger:
        existing = ledger.find(request.run_id, request.round)
        if existing is not None:
            replay = _replay(request, merchant, existing, ledger)
            if replay is not None:
                return replay
        plan = plan_round(request, merchant, data, _budget_history(ledger, merchant))
        result = _train(request, merchant, data, plan)
        out_sha = arrays_sha256(result.arrays)
        _write_outbox(_outbox_file(merchant, request), result.arrays)
        release = PrivacyRelease(
            merchant_id=merchant.id,
            run_id=request.run_id,
            round=request.round,
            model_in_sha256=request.model_in_sha256,
            model_out_sha256=out_sha,
            cohort=merchant.cohort,
            privacy_unit=merchant.privacy_unit,
            mechanism="poisson_subsampled_gaussian",
            noise_multiplier=plan.mechanism.noise_multiplier,
            sample_rate=plan.mechanism.sample_rate,
            steps=plan.mechanism.steps,
            clipping_norm=config.privacy.clipping_norm,
            delta=plan.delta,
            dataset_size=plan.records,
            accountant=config.privacy.accountant,
            epsilon_after=plan.epsilon_after,
            epsilon_cap=plan.cap,
            config_sha256=config.sha256(),
            library_versions=library_versions(),
            created_utc=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        )
        entry = ledger.append(release)
        backlog = _backlog(ledger, request, merchant, entry)
    metrics = {
        "num-examples": float(plan.records),
        "train-loss": result.mean_loss,
        "epsilon": plan.epsilon_after,
        "epsilon-cap": plan.cap,
        "delta": plan.delta,
        "noise-multiplier": plan.mechanism.noise_multiplier,
        "train-seconds": result.seconds,
    }
    return TrainReply(
        Outcome.TRAINED, merchant.id, "", result.arrays, metrics, entry.to_wire(), backlog
    )


def _run_non_private(
    request: TrainRequest, merchant: MerchantConfig, data: PreparedData
) -> TrainReply:
    """A baseline round without DP: only if the merchant's own configuration allows it, and
    never recorded as a DP release (there is no epsilon to record)."""
    if not merchant.allow_non_private:
        raise ConfigError(
            f"merchant {merchant.id} trains only with differential privacy "
            "(allow_non_private is false in its configuration)"
        )
    result = _train(request, merchant, data, None)
    metrics = {
        "num-examples": float(result.num_records),
        "train-loss": result.mean_loss,
        "train-seconds": result.seconds,
    }
    return TrainReply(Outcome.TRAINED, merchant.id, "non-private", result.arrays, metrics)


def _train(
    request: TrainRequest, merchant: MerchantConfig, data: PreparedData, plan: RoundPlan | None
) -> RoundResult:
    config = request.config
    stream = ("merchant", merchant.id, "round", request.round)
    records = training_records(
        data.encoded,
        data.catalog,
        unit=merchant.privacy_unit,
        negatives=config.training.negatives,
        events_per_customer=config.training.events_per_customer,
        rng=numpy_stream(request.seed, *stream, "records"),
    )
    device = _device(merchant)
    model = Recommender(config.model)
    load_state_arrays(model, request.arrays)
    model.to(device)
    mu = config.federation.proximal_mu if config.federation.strategy.value == "fedprox" else 0.0
    result = train_round(
        model=model,
        records=records,
        settings=LocalTraining(
            batch_size=config.training.batch_size,
            local_epochs=config.training.local_epochs,
            learning_rate=config.training.step_size,
            proximal_mu=mu,
            optimizer=config.training.optimizer,
            momentum=config.training.momentum,
        ),
        dp=None
        if plan is None
        else DPSettings(
            noise_multiplier=plan.mechanism.noise_multiplier,
            clipping_norm=config.privacy.clipping_norm,
        ),
        sampling_generator=torch_stream(request.seed, *stream, "sampling"),
        noise_generator=torch_stream(request.seed, *stream, "noise", device=device),
    )
    if plan is not None and result.mechanism != plan.mechanism:
        raise TrainingError(
            f"trained mechanism {result.mechanism} differs from plan {plan.mechanism}"
        )
    if not all(np.isfinite(a).all() for a in result.arrays.values()):
        raise TrainingError("training produced non-finite weights; nothing released")
    if math.isnan(result.mean_loss):
        log.warning("merchant %s: no loss recorded this round", merchant.id)
    return result
