"""The messages between the platform's ServerApp and the merchants' ClientApps.

One place for every key and every encoder: the platform's instructions (train, fine-tune,
evaluate) and the merchants' replies are dataclasses here with ``to_content`` and
``from_content``, so server, client, the in-process transport and the tests cannot drift apart.

What an instruction never carries: a seed or anything else that determines a merchant's DP
randomness (that comes from the merchant's own secret, client/dp_randomness.py), or another
merchant's state. What a reply carries: released weights, signed ledger entries, privacy figures
of the release, and evaluation sums and counts; no per-customer value and no training loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig, UpdateDtype
from common.errors import ConfigError, IntegrityError
from common.metric_sums import MetricSums

# message types (Flower's "<category>.<action>")
TRAIN = "train"
FINETUNE_ACTION = "finetune"
FINETUNE = f"train.{FINETUNE_ACTION}"
EVALUATE = "evaluate"

# records
# ArrayRecord: model weights keyed by parameter name; float32 from the platform, and from a
# merchant in the run's federation.update_dtype (encode_update)
ARRAYS = "arrays"
CONFIG = "config"  # ConfigRecord: the instruction (platform -> merchant)
METRICS = "metrics"  # MetricRecord: figures of a reply (merchant -> platform)
STATUS = "status"  # ConfigRecord: outcome, code, reason, merchant id, ledger entries
MODEL_PREFIX = "model:"  # evaluate: one ArrayRecord per model label

# config keys (platform -> merchant)
RUN_ID = "run-id"
ROUND = "round"
PLANNED_ROUNDS = "planned-rounds"
MODEL_IN_SHA256 = "model-in-sha256"
RUN_CONFIG_JSON = "run-config-json"  # the full RunConfig as JSON (model spec, training, privacy)
SIMULATION_DIR = "simulation-dir"  # simulation only: where merchants' configurations live
SERVER_LEDGER_SEQ = "server-ledger-seq"  # last seq of THIS merchant's chain the platform holds
EVAL_TASKS = "eval-tasks"  # JSON [[part, label], ...]
UNKNOWN_SEQ = -1  # the platform does not know yet which merchant a node is
# evaluation labels besides the models sent: the merchant's local baselines, and a model
# scored with the merchant's local part (client/evaluation.py)
BASELINE_LABELS = frozenset({"p-topfreq", "g-topfreq"})
LOCAL_SUFFIX = "+local"
STALE_SUFFIX = "@stale"  # fresh part only: histories cut at the end of the offline training data

# status keys (merchant -> platform)
OUTCOME = "outcome"
CODE = "code"
REASON = "reason"
MERCHANT_ID = "merchant-id"
LEDGER_ENTRY = "ledger-entry"
LEDGER_BACKLOG = "ledger-backlog"  # JSON list of earlier entries the platform has not seen

# metric keys (merchant -> platform)
NUM_EXAMPLES = "num-examples"
EPSILON = "epsilon"
EPSILON_CAP = "epsilon-cap"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
TRAIN_SECONDS = "train-seconds"
EVAL_SECONDS = "eval-seconds"

Arrays = dict[str, np.ndarray]


class Outcome(Enum):
    TRAINED = "trained"  # weights released (train) or sums computed (evaluate)
    REFUSED = "refused"  # the merchant declined, for a reason in RefusalCode
    FAILED = "failed"  # an error; nothing released


class RefusalCode(Enum):
    """Why a merchant declined; the platform counts refusals by these codes."""

    BUDGET = "budget"  # the round would pass the merchant's epsilon cap
    NO_FRESH_DATA = "no-fresh-data"  # fine-tuning: no inbox cohort yet
    COHORT_SPENT = "cohort-spent"  # fine-tuning: every cohort already took its rounds
    PRIVATE_ONLY = "private-only"  # a non-private round asked of a DP-only merchant
    NO_EVALUATION_DATA = "no-evaluation-data"  # nothing held out for the part asked


class FailureCode(Enum):
    """Why a merchant's reply brought nothing usable (merchant or platform side)."""

    BAD_REQUEST = "bad-request"  # the instruction was malformed or its model hash wrong
    DATA = "data"  # the merchant's own data or configuration is unusable
    INTEGRITY = "integrity"  # a file failed its hash or signature check
    ERROR = "error"  # any other error at the merchant
    REJECTED = "rejected"  # platform side: the update or its ledger entry failed a check
    ERROR_REPLY = "error-reply"  # platform side: Flower delivered an error instead of a reply
    RESTARTED = "restarted"  # platform side: the node restarted holding the message
    NO_REPLY = "no-reply"  # platform side: no answer within the round timeout


class EvalPart(Enum):
    """Which of its own held-out events a merchant scores a model on."""

    VALIDATION = "valid"  # held-out weeks after training (per-round model selection)
    TEST = "test"  # final held-out weeks
    FRESH = "fresh"  # online: the newest inbox cohort, before anything trained on it
    RECENT = "recent"  # online: held-out customers' events of the newest cohort (gate)


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def encode_update(arrays: Mapping[str, np.ndarray], dtype: UpdateDtype) -> Arrays:
    """Trained float32 weights as a merchant releases them: in ``dtype``. For float16 each
    value is rounded to the nearest float16, and a value beyond float16's range saturates at
    +-65504 instead of becoming infinite (see :func:`beyond_range`): the arrays returned are
    what the merchant's ledger hashes and what it sends, a function of the DP output only."""
    if dtype is UpdateDtype.FLOAT32:
        return {name: np.asarray(value, dtype=np.float32) for name, value in arrays.items()}
    return {
        name: np.clip(value, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
        for name, value in arrays.items()
    }


def beyond_range(arrays: Mapping[str, np.ndarray], dtype: UpdateDtype) -> int:
    """How many values :func:`encode_update` saturates (always 0 for float32)."""
    if dtype is UpdateDtype.FLOAT32:
        return 0
    return sum(int(np.count_nonzero(np.abs(value) > FLOAT16_MAX)) for value in arrays.values())


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named arrays as a Flower ArrayRecord (serialised with ``np.save``, never pickled)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> Arrays:
    return {name: array.numpy() for name, array in record.items()}


def _record(content: RecordDict, key: str, kind: type) -> Any:
    if key not in content:
        raise IntegrityError(f"message lacks its {key!r} record")
    record = content[key]
    if not isinstance(record, kind):
        raise IntegrityError(f"message record {key!r} is a {type(record).__name__}")
    return record


def _field(record: Mapping[str, Any], key: str) -> Any:
    try:
        return record[key]
    except KeyError:
        raise IntegrityError(f"message lacks {key!r}") from None


# -- platform -> merchant --------------------------------------------------------------


@dataclass(frozen=True)
class TrainInstruction:
    """A training (or fine-tuning) round: the global model and how to train it."""

    run_id: str
    round: int
    planned_rounds: int
    config: RunConfig
    arrays: Arrays
    model_in_sha256: str
    server_ledger_seq: int = UNKNOWN_SEQ
    simulation_dir: str | None = None

    def to_content(self) -> RecordDict:
        config: dict[str, Any] = {
            RUN_ID: self.run_id,
            ROUND: self.round,
            PLANNED_ROUNDS: self.planned_rounds,
            MODEL_IN_SHA256: self.model_in_sha256,
            RUN_CONFIG_JSON: json.dumps(self.config.to_dict()),
            SERVER_LEDGER_SEQ: self.server_ledger_seq,
        }
        if self.simulation_dir is not None:
            config[SIMULATION_DIR] = self.simulation_dir
        return RecordDict({ARRAYS: to_array_record(self.arrays), CONFIG: ConfigRecord(config)})

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainInstruction:
        config = _record(content, CONFIG, ConfigRecord)
        try:
            return cls(
                run_id=str(_field(config, RUN_ID)),
                round=int(_field(config, ROUND)),
                planned_rounds=int(_field(config, PLANNED_ROUNDS)),
                config=RunConfig.from_dict(json.loads(str(_field(config, RUN_CONFIG_JSON)))),
                arrays=from_array_record(_record(content, ARRAYS, ArrayRecord)),
                model_in_sha256=str(_field(config, MODEL_IN_SHA256)),
                server_ledger_seq=int(config.get(SERVER_LEDGER_SEQ, UNKNOWN_SEQ)),
                simulation_dir=_optional_str(config, SIMULATION_DIR),
            )
        except (ValueError, TypeError, ConfigError) as exc:
            raise IntegrityError(f"malformed train instruction: {exc}") from None


@dataclass(frozen=True)
class EvaluateInstruction:
    """Score models (by label) on parts of the merchant's held-out events."""

    run_id: str
    round: int
    config: RunConfig
    models: Mapping[str, Arrays]
    tasks: tuple[tuple[EvalPart, str], ...]
    simulation_dir: str | None = None

    def __post_init__(self) -> None:
        known = (
            set(self.models)
            | BASELINE_LABELS
            | {m + LOCAL_SUFFIX for m in self.models}
            | {m + STALE_SUFFIX for m in self.models}
        )
        unknown = sorted({label for _, label in self.tasks} - known)
        if unknown:
            raise ConfigError(f"evaluation tasks name models that were not sent: {unknown}")

    def to_content(self) -> RecordDict:
        config: dict[str, Any] = {
            RUN_ID: self.run_id,
            ROUND: self.round,
            RUN_CONFIG_JSON: json.dumps(self.config.to_dict()),
            EVAL_TASKS: json.dumps([[part.value, label] for part, label in self.tasks]),
        }
        if self.simulation_dir is not None:
            config[SIMULATION_DIR] = self.simulation_dir
        content = RecordDict({CONFIG: ConfigRecord(config)})
        for label, arrays in self.models.items():
            content[MODEL_PREFIX + label] = to_array_record(arrays)
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateInstruction:
        config = _record(content, CONFIG, ConfigRecord)
        try:
            tasks = tuple(
                (EvalPart(part), str(label))
                for part, label in json.loads(str(_field(config, EVAL_TASKS)))
            )
            models = {
                key[len(MODEL_PREFIX) :]: from_array_record(record)
                for key, record in content.items()
                if key.startswith(MODEL_PREFIX) and isinstance(record, ArrayRecord)
            }
            return cls(
                run_id=str(_field(config, RUN_ID)),
                round=int(_field(config, ROUND)),
                config=RunConfig.from_dict(json.loads(str(_field(config, RUN_CONFIG_JSON)))),
                models=models,
                tasks=tasks,
                simulation_dir=_optional_str(config, SIMULATION_DIR),
            )
        except (ValueError, TypeError, ConfigError) as exc:
            raise IntegrityError(f"malformed evaluate instruction: {exc}") from None


def _optional_str(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    return None if value in (None, "") else str(value)


# -- merchant -> platform --------------------------------------------------------------


@dataclass(frozen=True)
class MerchantReply:
    """A merchant's answer to a train or fine-tune instruction (one encoder for both)."""

    outcome: Outcome
    merchant_id: str
    code: str = ""  # a RefusalCode or FailureCode value; "" when trained
    reason: str = ""  # human text; never parsed
    arrays: Arrays | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    ledger_entry: str | None = None
    ledger_backlog: tuple[str, ...] = ()  # earlier entries the platform lacks, oldest first

    def to_content(self) -> RecordDict:
        status: dict[str, Any] = {
            OUTCOME: self.outcome.value,
            CODE: self.code,
            REASON: self.reason,
            MERCHANT_ID: self.merchant_id,
        }
        if self.ledger_entry is not None:
            status[LEDGER_ENTRY] = self.ledger_entry
            status[LEDGER_BACKLOG] = json.dumps(list(self.ledger_backlog))
        content = RecordDict(
            {STATUS: ConfigRecord(status), METRICS: MetricRecord(dict(self.metrics))}
        )
        if self.arrays is not None:
            content[ARRAYS] = to_array_record(self.arrays)
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> MerchantReply:
        status = _record(content, STATUS, ConfigRecord)
        metrics = _record(content, METRICS, MetricRecord)
        try:
            backlog = json.loads(str(status.get(LEDGER_BACKLOG, "[]")))
            if not isinstance(backlog, list) or not all(isinstance(b, str) for b in backlog):
                raise ValueError("ledger backlog must be a list of entries")
            arrays = content.get(ARRAYS)
            return cls(
                outcome=Outcome(str(_field(status, OUTCOME))),
                merchant_id=str(_field(status, MERCHANT_ID)),
                code=str(status.get(CODE, "")),
                reason=str(status.get(REASON, "")),
                arrays=from_array_record(arrays) if isinstance(arrays, ArrayRecord) else None,
                metrics={str(k): _finite(k, v) for k, v in metrics.items()},
                ledger_entry=_optional_str(status, LEDGER_ENTRY),
                ledger_backlog=tuple(backlog),
            )
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"malformed merchant reply: {exc}") from None


@dataclass(frozen=True)
class EvaluationReply:
    """A merchant's evaluation sums: ``sums[part][label]``; nothing per customer."""

    outcome: Outcome
    merchant_id: str
    sums: Mapping[EvalPart, Mapping[str, MetricSums]] = field(default_factory=dict)
    code: str = ""
    reason: str = ""
    seconds: float = 0.0

    def to_content(self) -> RecordDict:
        flat: dict[str, float] = {EVAL_SECONDS: self.seconds}
        for part, by_label in self.sums.items():
            for label, sums in by_label.items():
                flat.update(sums.to_flat(f"{part.value}|{label}"))
        status = {
            OUTCOME: self.outcome.value,
            CODE: self.code,
            REASON: self.reason,
            MERCHANT_ID: self.merchant_id,
        }
        return RecordDict({STATUS: ConfigRecord(status), METRICS: MetricRecord(flat)})  # type: ignore[arg-type]

    @classmethod
    def from_content(
        cls, content: RecordDict, tasks: tuple[tuple[EvalPart, str], ...]
    ) -> EvaluationReply:
        status = _record(content, STATUS, ConfigRecord)
        metrics = {str(k): float(v) for k, v in _record(content, METRICS, MetricRecord).items()}
        try:
            outcome = Outcome(str(_field(status, OUTCOME)))
        except ValueError as exc:
            raise IntegrityError(f"malformed evaluation reply: {exc}") from None
        sums: dict[EvalPart, dict[str, MetricSums]] = {}
        if outcome is Outcome.TRAINED:
            for part, label in tasks:
                prefix = f"{part.value}|{label}"
                if any(k.startswith(prefix + "|") for k in metrics):
                    sums.setdefault(part, {})[label] = MetricSums.from_flat(prefix, metrics)
        return cls(
            outcome=outcome,
            merchant_id=str(_field(status, MERCHANT_ID)),
            sums=sums,
            code=str(status.get(CODE, "")),
            reason=str(status.get(REASON, "")),
            seconds=float(metrics.get(EVAL_SECONDS, 0.0)),
        )


def _finite(key: str, value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"metric {key!r} is not finite: {value!r}")
    return number


def reply_to(message: Message, content: RecordDict) -> Message:
    return Message(content=content, reply_to=message)
