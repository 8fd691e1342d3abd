"""The merchant's Flower ClientApp (Message API).

Where a merchant's configuration comes from:
- deployment: the SuperNode's node config ``merchant-config`` = path to ``merchant.toml``;
- simulation: ``partition-id`` picks ``merchants/<index>/merchant.toml`` under the
  ``simulation-dir`` the ServerApp announces in the round's config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.merchant import MerchantConfig
from client.merchant_round import TrainRequest, run_merchant_round
from common import protocol as P
from common.config import RunConfig
from common.errors import ConfigError

log = logging.getLogger(__name__)

app = ClientApp()


def resolve_merchant(context: Context, config: ConfigRecord) -> MerchantConfig:
    node = context.node_config
    if "merchant-config" in node:
        return MerchantConfig.from_toml(Path(str(node["merchant-config"])))
    if P.SIMULATION_DIR in config and "partition-id" in node:
        root = Path(str(config[P.SIMULATION_DIR]))
        index = json.loads((root / "merchants.json").read_text())[int(node["partition-id"])]
        return MerchantConfig.from_toml(root / "merchants" / index / "merchant.toml")
    raise ConfigError(
        "this node has no 'merchant-config' in its node config (see docs/deployment.md)"
    )


def parse_request(msg: Message) -> TrainRequest:
    config = msg.content[P.CONFIG]
    arrays = msg.content[P.ARRAYS]
    assert isinstance(config, ConfigRecord) and isinstance(arrays, ArrayRecord)
    return TrainRequest(
        run_id=str(config[P.RUN_ID]),
        round=int(config[P.ROUND]),  # type: ignore[arg-type]
        planned_rounds=int(config[P.PLANNED_ROUNDS]),  # type: ignore[arg-type]
        seed=int(config[P.SEED]),  # type: ignore[arg-type]
        model_in_sha256=str(config[P.MODEL_IN_SHA256]),
        config=RunConfig.from_dict(json.loads(str(config[P.RUN_CONFIG_JSON]))),
        arrays=P.from_array_record(arrays),
        server_seqs={
            str(k): int(v)
            for k, v in json.loads(str(config.get(P.SERVER_LEDGER_SEQS, "{}"))).items()
        },
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content[P.CONFIG]
    assert isinstance(config, ConfigRecord)
    merchant = resolve_merchant(context, config)
    reply = run_merchant_round(parse_request(msg), merchant)
    content = RecordDict()
    status = {
        P.OUTCOME: reply.outcome.value,
        P.REASON: reply.reason,
        P.MERCHANT_ID: reply.merchant_id,
    }
    if reply.ledger_entry is not None:
        status[P.LEDGER_ENTRY] = reply.ledger_entry
        status[P.LEDGER_BACKLOG] = json.dumps(list(reply.ledger_backlog))
    content[P.STATUS] = ConfigRecord(status)  # type: ignore[arg-type]
    content[P.METRICS] = MetricRecord(reply.metrics)  # type: ignore[arg-type]
    if reply.arrays is not None:
        content[P.ARRAYS] = P.to_array_record(reply.arrays)
    return Message(content=content, reply_to=msg)


@app.train("finetune")
def finetune(msg: Message, context: Context) -> Message:
    """Online fine-tuning on the merchant's newest inbox cohort (see client/finetune.py)."""
    from client.finetune import reply_content, run_finetune_round

    config = msg.content[P.CONFIG]
    assert isinstance(config, ConfigRecord)
    merchant = resolve_merchant(context, config)
    reply = run_finetune_round(parse_request(msg), merchant)
    return Message(content=reply_content(reply), reply_to=msg)


@app.query("publish")
def publish(msg: Message, context: Context) -> Message:
    """A new serving version (or A/B candidate) from the platform (see client/publish.py)."""
    from client.publish import publication_reply

    config = msg.content[P.CONFIG]
    assert isinstance(config, ConfigRecord)
    reply = publication_reply(config, resolve_merchant(context, config))
    return Message(content=reply, reply_to=msg)


@app.query("abevidence")
def ab_evidence(msg: Message, context: Context) -> Message:
    """Aggregate A/B counts for the platform's online gate (see client/serving/evidence.py)."""
    from client.serving.evidence import evidence_reply

    config = msg.content[P.CONFIG]
    assert isinstance(config, ConfigRecord)
    reply = evidence_reply(config, resolve_merchant(context, config))
    return Message(content=reply, reply_to=msg)
