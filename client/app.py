"""The merchant's Flower ClientApp (Message API): train, fine-tune, evaluate.

Where a merchant's configuration comes from:
- deployment: the SuperNode's node config ``merchant-config`` = path to ``merchant.toml``;
- simulation: ``partition-id`` picks ``merchants/<index>/merchant.toml`` under the
  ``simulation-dir`` the ServerApp announces in the instruction.

Every handler decodes its instruction and encodes its reply with common/protocol.py (one
encoder per message kind), so the offline, online and evaluation replies carry the same keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.merchant import MerchantConfig
from common import protocol as P
from common.errors import ConfigError, FedshopError
from common.protocol import (
    EvaluateInstruction,
    EvaluationReply,
    FailureCode,
    MerchantReply,
    Outcome,
    TrainInstruction,
)

log = logging.getLogger(__name__)

app = ClientApp()


def resolve_merchant(context: Context, simulation_dir: str | None) -> MerchantConfig:
    node = context.node_config
    if "merchant-config" in node:
        return MerchantConfig.from_toml(Path(str(node["merchant-config"])))
    if simulation_dir is not None and "partition-id" in node:
        root = Path(simulation_dir)
        index = json.loads((root / "merchants.json").read_text())[int(node["partition-id"])]
        return MerchantConfig.from_toml(root / "merchants" / index / "merchant.toml")
    raise ConfigError(
        "this node has no 'merchant-config' in its node config (see docs/deployment.md)"
    )


def _failure(context: Context, exc: FedshopError) -> MerchantReply:
    """A reply for an instruction that could not even be read (no merchant id known yet)."""
    who = str(context.node_config.get("merchant-id", f"node-{context.node_id}"))
    return MerchantReply(Outcome.FAILED, who, FailureCode.BAD_REQUEST.value, exc.one_line())


def handle_train(msg: Message, context: Context, *, finetune: bool) -> RecordDict:
    """Decode, run the round (offline or fine-tuning), encode: the one path for both."""
    from client.finetune import run_finetune_round  # torch: import when a message needs it
    from client.merchant_round import run_merchant_round

    try:
        instruction = TrainInstruction.from_content(msg.content)
        merchant = resolve_merchant(context, instruction.simulation_dir)
    except FedshopError as exc:
        return _failure(context, exc).to_content()
    run = run_finetune_round if finetune else run_merchant_round
    return run(instruction, merchant).to_content()


def handle_evaluate(msg: Message, context: Context) -> RecordDict:
    from client.evaluation import evaluate_at_merchant

    try:
        instruction = EvaluateInstruction.from_content(msg.content)
        merchant = resolve_merchant(context, instruction.simulation_dir)
    except FedshopError as exc:
        failure = _failure(context, exc)
        return EvaluationReply(
            Outcome.FAILED, failure.merchant_id, code=failure.code, reason=failure.reason
        ).to_content()
    return evaluate_at_merchant(instruction, merchant).to_content()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return P.reply_to(msg, handle_train(msg, context, finetune=False))


@app.train(P.FINETUNE_ACTION)
def finetune(msg: Message, context: Context) -> Message:
    """Online fine-tuning on the merchant's newest inbox cohort (see client/finetune.py)."""
    return P.reply_to(msg, handle_train(msg, context, finetune=True))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation on the merchant's own held-out events (see client/evaluation.py)."""
    return P.reply_to(msg, handle_evaluate(msg, context))


def _query_merchant(msg: Message, context: Context) -> tuple[ConfigRecord, MerchantConfig]:
    config = msg.content[P.CONFIG]
    if not isinstance(config, ConfigRecord):
        raise ConfigError("the query carries no configuration record")
    simulation_dir = config.get(P.SIMULATION_DIR)
    return config, resolve_merchant(context, str(simulation_dir) if simulation_dir else None)


@app.query("publish")
def publish(msg: Message, context: Context) -> Message:
    """A new serving version (or A/B candidate) from the platform (see client/publish.py)."""
    from client.publish import publication_reply

    config, merchant = _query_merchant(msg, context)
    return P.reply_to(msg, publication_reply(config, merchant))


@app.query("abevidence")
def ab_evidence(msg: Message, context: Context) -> Message:
    """Aggregate A/B counts for the platform's online gate (see client/serving/evidence.py)."""
    from client.serving.evidence import evidence_reply

    config, merchant = _query_merchant(msg, context)
    return P.reply_to(msg, evidence_reply(config, merchant))
