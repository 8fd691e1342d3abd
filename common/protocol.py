"""Keys of the messages exchanged between the ServerApp and the merchants' ClientApps.

One place for every key, so that server, client and tests cannot drift apart.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from flwr.app import Array, ArrayRecord

ARRAYS = "arrays"  # ArrayRecord: model weights, plain float32 arrays keyed by parameter name
CONFIG = "config"  # ConfigRecord: the round's instructions (server -> merchant)
METRICS = "metrics"  # MetricRecord: numbers about the round (merchant -> server)
STATUS = "status"  # ConfigRecord: outcome, reason, merchant id, ledger entry (merchant -> server)

# config keys (server -> merchant)
RUN_ID = "run-id"
ROUND = "round"
PLANNED_ROUNDS = "planned-rounds"
SEED = "seed"
MODEL_IN_SHA256 = "model-in-sha256"
RUN_CONFIG_JSON = "run-config-json"  # the full RunConfig as JSON (model spec, training, privacy)
SIMULATION_DIR = "simulation-dir"  # simulation only: where merchants' configurations live
SERVER_LEDGER_SEQS = "server-ledger-seqs"  # JSON {merchant: last seq the platform holds}

# status keys (merchant -> server)
OUTCOME = "outcome"
REASON = "reason"
MERCHANT_ID = "merchant-id"
LEDGER_ENTRY = "ledger-entry"
LEDGER_BACKLOG = "ledger-backlog"  # JSON list of earlier entries the platform has not seen

# metric keys
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
EPSILON_CAP = "epsilon-cap"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
TRAIN_SECONDS = "train-seconds"


class Outcome(Enum):
    TRAINED = "trained"
    REFUSED = "refused"  # budget: no weights released
    FAILED = "failed"  # an error on the merchant side: no weights released


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named arrays as a Flower ArrayRecord (serialised with ``np.save``, never pickled)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}
