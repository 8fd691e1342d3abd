"""One merchant round, independent of Flower's message types.

Order of operations is the privacy contract: check the budget, train, write the released
weights to the outbox, append the signed release to the ledger, and only then hand the
weights back for sending. A crash after the ledger append leaves the spend counted; a second
request for the same run and round re-sends the stored weights instead of spending again.

Every random draw of the round (records, Poisson batches, noise) comes from the merchant's
own secret (client/dp_randomness.py): nothing in the instruction determines it, so the
platform cannot replay the round, while the merchant replays it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from client.dp_randomness import (
    MerchantSecret,
    ensure_merchant_secret,
    load_merchant_secret,
    secret_path,
)
from client.merchant import MerchantConfig
from client.merchant_data import TrainingData, training_data
from client.nextbasket_training import train_scorer
from client.training import DPSettings, LocalTraining, RoundResult, steps_per_round
from common import protocol as P
from common.accounting import (
    AccountantKind,
    MechanismStep,
    epsilon_spent,
    noise_for_target,
)
from common.arrays_io import arrays_sha256, arrays_to_npz, npz_to_arrays
from common.atomic import atomic_write_bytes
from common.config import UpdateDtype
from common.errors import (
    ConfigError,
    DataValidationError,
    FedshopError,
    IntegrityError,
    PrivacyBudgetExceededError,
    StateError,
    TrainingError,
)
from common.keys import load_signing_key
from common.ledger import (
    MECHANISM,
    NOISE_SOURCE,
    LedgerEntry,
    MerchantLedger,
    PrivacyRelease,
    composition_history,
    utc_now_iso,
)
from common.nextbasket.model import BasketScorer, RecordTensors, load_shared_arrays
from common.nextbasket.records import count_records, training_records
from common.protocol import FailureCode, MerchantReply, Outcome, RefusalCode, TrainInstruction

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "opacus", "flwr", "numpy", "dp-accounting", "fedshop")


@dataclass(frozen=True)
class RoundPlan:
    """The mechanism a round will run and the epsilon the cohort reaches if it does."""

    mechanism: MechanismStep
    delta: float
    cap: float
    accountant: AccountantKind
    epsilon_after: float  # by ``accountant``
    epsilon_rdp: float
    records: int


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def open_merchant_ledger(merchant: MerchantConfig) -> MerchantLedger:
    """The merchant's ledger, opened and verified (hash chain and signatures)."""
    merchant.state_dir.mkdir(parents=True, exist_ok=True)
    return MerchantLedger.open(
        merchant.ledger_path,
        merchant_id=merchant.id,
        signing_key=load_signing_key(merchant.signing_key),
    )


def merchant_secret(merchant: MerchantConfig, ledger: MerchantLedger) -> MerchantSecret:
    """The merchant's DP secret; created here only for a merchant that never released."""
    if not secret_path(merchant.state_dir).exists():
        if ledger.last_seq > 0:
            raise StateError(
                f"merchant {merchant.id}: the DP secret in {merchant.state_dir} is missing but "
                f"the ledger holds {ledger.last_seq} releases; restore the secret from backup"
            )
        ensure_merchant_secret(merchant.state_dir)
    return load_merchant_secret(merchant.state_dir)


def plan_round(
    instruction: TrainInstruction,
    merchant: MerchantConfig,
    data: TrainingData,
    spent: list[LedgerEntry],
) -> RoundPlan:
    """Choose sigma and project epsilon; raise PrivacyBudgetExceededError past the cap.

    ``spent`` is the merchant's whole chain; the releases this round composes with are picked
    by the same rule the platform and the auditors use (common/ledger/claims.py).
    """
    privacy = instruction.config.privacy
    unit = merchant.privacy_unit
    accountant = privacy.accountant
    records = count_records(data.cases, unit)
    if records < 1:
        raise DataValidationError(f"merchant {merchant.id} has no training basket to learn from")
    delta = min(merchant.delta, privacy.delta, 1.0 / (10 * records))
    cap = min(merchant.epsilon_cap, privacy.epsilon_cap)
    settings = LocalTraining(
        batch_size=instruction.config.training.batch_for(unit),
        local_epochs=instruction.config.training.local_epochs,
    )
    q, steps = steps_per_round(records, settings)
    composing = composition_history(spent, unit=unit, cohort=merchant.cohort)
    history = [e.release.mechanism_step for e in composing]
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    else:
        before_run = [
            h
            for h, e in zip(history, composing, strict=True)
            if e.release.run_id != instruction.run_id
        ]
        try:
            sigma = noise_for_target(
                target_epsilon=cap,
                delta=delta,
                sample_rate=q,
                steps=steps * instruction.planned_rounds,
                prior=before_run,
                max_noise_multiplier=merchant.max_noise_multiplier,
                accountant=accountant,
            )
        except ConfigError as exc:
            raise PrivacyBudgetExceededError(f"merchant {merchant.id}: {exc}") from None
    mechanism = MechanismStep(sigma, q, steps)
    after = [*history, mechanism]
    epsilon_after = epsilon_spent(after, delta=delta, accountant=accountant)
    if epsilon_after > cap * (1 + 1e-9):
        raise PrivacyBudgetExceededError(
            f"merchant {merchant.id}: round {instruction.round} would reach epsilon "
            f"{epsilon_after:.3f} > cap {cap:g} (cohort {merchant.cohort!r}, spent "
            f"{epsilon_spent(history, delta=delta, accountant=accountant):.3f})"
        )
    return RoundPlan(
        mechanism=mechanism,
        delta=delta,
        cap=cap,
        accountant=accountant,
        epsilon_after=epsilon_after,
        epsilon_rdp=epsilon_spent(after, delta=delta, accountant=AccountantKind.RDP),
        records=records,
    )


def _outbox_file(merchant: MerchantConfig, instruction: TrainInstruction) -> Path:
    return merchant.outbox / f"{instruction.run_id}-round{instruction.round:04d}.npz"


def _device(merchant: MerchantConfig) -> torch.device:
    if merchant.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(merchant.device)


def _privacy_metrics(release: PrivacyRelease) -> dict[str, float]:
    return {
        P.NUM_EXAMPLES: float(release.dataset_size),
        P.EPSILON: release.epsilon_after,
        P.EPSILON_CAP: release.epsilon_cap,
        P.DELTA: release.delta,
        P.NOISE_MULTIPLIER: release.noise_multiplier,
    }


def _backlog(
    ledger: MerchantLedger, instruction: TrainInstruction, entry: LedgerEntry
) -> tuple[str, ...]:
    """Earlier releases the platform has not recorded (e.g. the merchant crashed after its
    ledger append but before sending): they travel with this one so the chains stay whole.
    A platform that does not know this node yet gets every earlier entry (it skips those it
    holds)."""
    known = max(instruction.server_ledger_seq, 0)
    return tuple(e.to_wire() for e in ledger.entries_after(known) if e.seq < entry.seq)


def _replay(
    instruction: TrainInstruction,
    merchant: MerchantConfig,
    entry: LedgerEntry,
    ledger: MerchantLedger,
) -> MerchantReply | None:
    """Re-send a release already in the ledger (same run, round and input model)."""
    path = _outbox_file(merchant, instruction)
    if entry.release.model_in_sha256 != instruction.model_in_sha256 or not path.exists():
        return None
    arrays = npz_to_arrays(path.read_bytes())
    if arrays_sha256(arrays) != entry.release.model_out_sha256:
        return None
    log.info(
        "merchant %s: round %d already released; re-sending it", merchant.id, entry.release.round
    )
    return MerchantReply(
        Outcome.TRAINED,
        merchant.id,
        reason="re-sent",
        arrays=arrays,
        metrics=_privacy_metrics(entry.release),
        ledger_entry=entry.to_wire(),
        ledger_backlog=_backlog(ledger, instruction, entry),
    )


def run_merchant_round(
    instruction: TrainInstruction,
    merchant: MerchantConfig,
    *,
    data: TrainingData | None = None,
    ledger: MerchantLedger | None = None,
) -> MerchantReply:
    """Train one round or refuse; never raises for expected failures.

    ``data`` is the merchant's prepared training data when the caller already holds it (an
    inbox cohort read once, from the bytes whose hash was checked); otherwise it is read from
    ``merchant.data``. ``ledger`` is the merchant's ledger when the caller already opened (and
    verified) it; otherwise it is opened here.
    """
    try:
        return _run(instruction, merchant, data, ledger)
    except PrivacyBudgetExceededError as exc:
        log.warning("%s", exc)
        return MerchantReply(Outcome.REFUSED, merchant.id, RefusalCode.BUDGET.value, str(exc))
    except FedshopError as exc:
        log.error("merchant %s failed: %s", merchant.id, exc.one_line())
        code = FailureCode.INTEGRITY if isinstance(exc, IntegrityError) else FailureCode.DATA
        return MerchantReply(Outcome.FAILED, merchant.id, code.value, exc.one_line())


def _run(
    instruction: TrainInstruction,
    merchant: MerchantConfig,
    data: TrainingData | None,
    open_ledger: MerchantLedger | None,
) -> MerchantReply:
    if arrays_sha256(instruction.arrays) != instruction.model_in_sha256:
        raise IntegrityError("received model does not match its announced hash")
    config = instruction.config
    torch.set_num_threads(merchant.threads)
    if data is None:
        data = training_data(merchant.data, config.model)
    merchant.state_dir.mkdir(parents=True, exist_ok=True)
    if not config.privacy.enabled:
        return _run_non_private(instruction, merchant, data)
    with (
        contextlib.nullcontext(open_ledger) if open_ledger else open_merchant_ledger(merchant)
    ) as ledger:
        secret = merchant_secret(merchant, ledger)
        existing = ledger.find(instruction.run_id, instruction.round)
        if existing is not None:
            replay = _replay(instruction, merchant, existing, ledger)
            if replay is not None:
                return replay
        plan = plan_round(instruction, merchant, data, ledger.entries())
        result = _train(instruction, merchant, data, plan, secret)
        atomic_write_bytes(_outbox_file(merchant, instruction), arrays_to_npz(result.arrays))
        entry = ledger.append(_release(instruction, merchant, plan, result))
        backlog = _backlog(ledger, instruction, entry)
    metrics = {**_privacy_metrics(entry.release), P.TRAIN_SECONDS: result.seconds}
    return MerchantReply(
        Outcome.TRAINED,
        merchant.id,
        arrays=result.arrays,
        metrics=metrics,
        ledger_entry=entry.to_wire(),
        ledger_backlog=backlog,
    )


def _release(
    instruction: TrainInstruction,
    merchant: MerchantConfig,
    plan: RoundPlan,
    result: RoundResult,
) -> PrivacyRelease:
    return PrivacyRelease(
        merchant_id=merchant.id,
        run_id=instruction.run_id,
        round=instruction.round,
        model_in_sha256=instruction.model_in_sha256,
        model_out_sha256=arrays_sha256(result.arrays),
        cohort=merchant.cohort,
        privacy_unit=merchant.privacy_unit,
        mechanism=MECHANISM,
        noise_source=NOISE_SOURCE,
        noise_multiplier=plan.mechanism.noise_multiplier,
        sample_rate=plan.mechanism.sample_rate,
        steps=plan.mechanism.steps,
        clipping_norm=instruction.config.privacy.clipping_norm,
        delta=plan.delta,
        dataset_size=plan.records,
        accountant=plan.accountant,
        epsilon_after=plan.epsilon_after,
        epsilon_rdp=plan.epsilon_rdp,
        epsilon_cap=plan.cap,
        config_sha256=instruction.config.sha256(),
        library_versions=library_versions(),
        created_utc=utc_now_iso(),
    )


def _run_non_private(
    instruction: TrainInstruction, merchant: MerchantConfig, data: TrainingData
) -> MerchantReply:
    """A baseline round without DP: only if the merchant's own configuration allows it, and
    never recorded as a DP release (there is no epsilon to record)."""
    if not merchant.allow_non_private:
        return MerchantReply(
            Outcome.REFUSED,
            merchant.id,
            RefusalCode.PRIVATE_ONLY.value,
            f"merchant {merchant.id} trains only with differential privacy "
            "(allow_non_private is false in its configuration)",
        )
    secret = load_merchant_secret(ensure_merchant_secret(merchant.state_dir).parent)
    result = _train(instruction, merchant, data, None, secret)
    metrics = {P.NUM_EXAMPLES: float(result.num_records), P.TRAIN_SECONDS: result.seconds}
    return MerchantReply(
        Outcome.TRAINED, merchant.id, reason="non-private", arrays=result.arrays, metrics=metrics
    )


def _train(
    instruction: TrainInstruction,
    merchant: MerchantConfig,
    data: TrainingData,
    plan: RoundPlan | None,
    secret: MerchantSecret,
) -> RoundResult:
    config = instruction.config
    stream = (instruction.run_id, "round", instruction.round)
    unit = merchant.privacy_unit
    records = training_records(
        data.cases,
        data.features,
        data.items,
        unit=unit,
        spec=config.records,
        rng=secret.numpy_stream(*stream, "records"),
    )
    device = _device(merchant)
    model = BasketScorer(config.model)
    load_shared_arrays(model, instruction.arrays)
    model.to(device)
    mu = config.federation.proximal_mu if config.federation.strategy.value == "fedprox" else 0.0
    result = train_scorer(
        model=model,
        records=RecordTensors.of(records),
        settings=LocalTraining(
            batch_size=config.training.batch_for(unit),
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
        sampling_generator=secret.torch_stream(*stream, "sampling"),
        noise_generator=secret.torch_stream(*stream, "noise", device=device),
    )
    if plan is not None and result.mechanism != plan.mechanism:
        raise TrainingError(
            f"trained mechanism {result.mechanism} differs from plan {plan.mechanism}"
        )
    if not all(np.isfinite(a).all() for a in result.arrays.values()):
        raise TrainingError("training produced non-finite weights; nothing released")
    if math.isnan(result.mean_loss):
        log.warning("merchant %s: no loss recorded this round", merchant.id)
    return _as_released(result, merchant, config.federation.update_dtype)


def _as_released(result: RoundResult, merchant: MerchantConfig, dtype: UpdateDtype) -> RoundResult:
    """The weights in the dtype the reply carries: what the outbox keeps, the ledger hashes and
    the platform receives. Rounding (and saturating) after training is post-processing of the
    DP output: it changes no privacy figure."""
    saturated = P.beyond_range(result.arrays, dtype)
    if saturated:
        log.warning(
            "merchant %s: %d weights are beyond %s's range and saturate at +-%g; the platform "
            "will refuse this update (run with federation.update_dtype = float32)",
            merchant.id,
            saturated,
            dtype.value,
            P.FLOAT16_MAX,
        )
    return dataclasses.replace(result, arrays=P.encode_update(result.arrays, dtype))
