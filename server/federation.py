"""The platform's round loop on top of Flower's Grid (Message API).

Per round: announce the global model, collect replies, keep only updates that pass the shape/
value checks and whose signed ledger entry verifies, aggregate, evaluate, checkpoint. Refusals
and failures are logged with their reasons and the round goes on while enough merchants remain.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import protocol as P
from common.arrays_io import arrays_to_npz
from common.atomic import atomic_write_bytes
from common.config import RunConfig
from common.errors import FedshopError
from common.keys import load_verify_key
from common.ledger import ExpectedRelease, ServerLedger
from common.model import Recommender, arrays_sha256, load_state_arrays, state_arrays
from common.rng import derive_seed
from server.checkpoint import Checkpoint, load_latest, save_checkpoint
from server.evaluation_set import EvaluationSet
from server.exchange import exchange
from server.strategies import MerchantUpdate, build_strategy
from server.update_checks import check_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    config: RunConfig
    run_dir: Path
    keys_dir: Path  # merchants' Ed25519 public keys: <merchant-id>.pub
    ledger_path: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    validation_set: Path | None = None
    test_set: Path | None = None
    simulation_dir: Path | None = None
    stop_after_round: int | None = None  # stop early (to exercise --resume)
    node_wait_s: float = 120.0

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(text: str, limit: int = 300) -> str:
    """The last meaningful line of a remote traceback, without terminal colours."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("File ", "^", "~"))]
    return (useful[-1] if useful else text)[:limit]


def initial_model(config: RunConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(derive_seed(config.seed, "initial-model") % (2**31))
    return state_arrays(Recommender(config.model))


@dataclass
class RoundOutcome:
    updates: list[MerchantUpdate] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)


class Federation:
    def __init__(self, grid: Grid, settings: ServerSettings) -> None:
        self.grid = grid
        self.settings = settings
        self.config = settings.config
        self.strategy = build_strategy(self.config.federation)
        self.validation = (
            EvaluationSet.load(settings.validation_set) if settings.validation_set else None
        )
        self.model = Recommender(self.config.model)
        self._ledger_seqs: dict[str, int] | None = None

    # -- one round ---------------------------------------------------------------
    def _nodes(self) -> list[int]:
        deadline = time.monotonic() + self.settings.node_wait_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.config.federation.min_merchants or time.monotonic() > deadline:
                return nodes
            time.sleep(1.0)

    def _messages(
        self, arrays: dict[str, np.ndarray], rnd: int, nodes: list[int], message_type: str
    ) -> list[Message]:
        config: dict[str, Any] = {
            P.RUN_ID: self.settings.run_id,
            P.ROUND: rnd,
            P.PLANNED_ROUNDS: self.config.federation.rounds,
            P.SEED: self.config.seed,
            P.MODEL_IN_SHA256: arrays_sha256(arrays),
            P.RUN_CONFIG_JSON: json.dumps(self.config.to_dict()),
        }
        if self.settings.simulation_dir is not None:
            config[P.SIMULATION_DIR] = str(self.settings.simulation_dir)
        if self._ledger_seqs is not None:
            config[P.SERVER_LEDGER_SEQS] = json.dumps(self._ledger_seqs)
        messages = []
        for node in nodes:
            content = RecordDict(
                {P.ARRAYS: P.to_array_record(arrays), P.CONFIG: ConfigRecord(config)}
            )
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def _accept(
        self,
        reply: Message,
        arrays: dict[str, np.ndarray],
        rnd: int,
        ledger: ServerLedger,
        outcome: RoundOutcome,
    ) -> None:
        if reply.has_error():
            outcome.failed[f"node-{reply.metadata.src_node_id}"] = short_reason(
                str(reply.error.reason)
            )
            return
        status = reply.content[P.STATUS]
        metrics = reply.content[P.METRICS]
        assert isinstance(status, ConfigRecord) and isinstance(metrics, MetricRecord)
        merchant = str(status[P.MERCHANT_ID])
        kind = P.Outcome(str(status[P.OUTCOME]))
        if kind is not P.Outcome.TRAINED:
            target = outcome.refused if kind is P.Outcome.REFUSED else outcome.failed
            target[merchant] = str(status[P.REASON])
            return
        try:
            update = P.from_array_record(reply.content[P.ARRAYS])  # type: ignore[arg-type]
            check_update(update, arrays, max_update_norm=self.config.federation.max_update_norm)
            if not self.config.privacy.enabled:  # a baseline run: nothing to verify or account
                outcome.losses[merchant] = float(metrics.get(P.TRAIN_LOSS, float("nan")))  # type: ignore[arg-type]
                examples = int(float(str(metrics[P.NUM_EXAMPLES])))
                outcome.updates.append(MerchantUpdate(merchant, update, examples))
                return
            expected = ExpectedRelease(
                run_id=self.settings.run_id,
                round=rnd,
                model_in_sha256=arrays_sha256(arrays),
                clipping_norm=self.config.privacy.clipping_norm,
                max_delta=self.config.privacy.delta,
                max_epsilon=self.config.privacy.epsilon_cap,
                min_noise_multiplier=self.config.privacy.noise_multiplier or 0.0,
            )
            entry = ledger.accept(
                str(status[P.LEDGER_ENTRY]),
                verify_key=load_verify_key(self.settings.keys_dir / f"{merchant}.pub"),
                expected=expected,
                model_out_sha256=arrays_sha256(update),
                merchant_id=merchant,
                backlog=json.loads(str(status.get(P.LEDGER_BACKLOG, "[]"))),
            )
        except (FedshopError, KeyError) as exc:
            reason = exc.one_line() if isinstance(exc, FedshopError) else f"missing {exc}"
            outcome.failed[merchant] = f"update rejected: {reason}"
            return
        outcome.epsilon[merchant] = entry.release.epsilon_after
        outcome.losses[merchant] = float(metrics.get(P.TRAIN_LOSS, float("nan")))  # type: ignore[arg-type]
        outcome.updates.append(MerchantUpdate(merchant, update, int(entry.release.dataset_size)))

    def run_round(
        self,
        arrays: dict[str, np.ndarray],
        rnd: int,
        ledger: ServerLedger,
        *,
        message_type: str = "train",
    ) -> RoundOutcome:
        """Send ``arrays`` to every connected merchant (``message_type`` picks the ClientApp
        action, e.g. ``train.finetune``) and sort the replies into usable updates, refusals
        and failures."""
        nodes = self._nodes()
        self._ledger_seqs = {m: ledger.last_seq(m) for m in ledger.merchants()}
        sent = exchange(
            self.grid,
            self._messages(arrays, rnd, nodes, message_type),
            timeout_s=self.config.federation.round_timeout_s,
        )
        outcome = RoundOutcome()
        for reply in sent.replies:
            self._accept(reply, arrays, rnd, ledger, outcome)
        for node in sent.restarted:
            outcome.failed[f"node-{node}"] = "restarted mid-round; the model it held was lost"
        if sent.unanswered:
            outcome.failed["(no reply)"] = (
                f"{len(sent.unanswered)} merchant(s) did not answer in "
                f"{self.config.federation.round_timeout_s:g} s"
            )
        for merchant, reason in sorted(outcome.refused.items()):
            log.warning("round %d: merchant %s refused: %s", rnd, merchant, reason)
        for merchant, reason in sorted(outcome.failed.items()):
            log.warning("round %d: merchant %s dropped: %s", rnd, merchant, reason)
        return outcome

    # -- the run -----------------------------------------------------------------
    def evaluate(
        self, arrays: dict[str, np.ndarray], evaluation: EvaluationSet | None
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        if evaluation is None:
            return {}, {}
        load_state_arrays(self.model, arrays)
        return evaluation.evaluate(self.model)

    def run(self) -> dict[str, Any]:
        settings = self.settings
        arrays, history, start = self._restore()
        ledger = ServerLedger.open(settings.ledger_path)
        try:
            for rnd in range(start, self.config.federation.rounds + 1):
                arrays, row = self._one_round(arrays, rnd, ledger, history)
                history.append(row)
                save_checkpoint(
                    settings.checkpoints,
                    Checkpoint(
                        round=rnd,
                        run_id=settings.run_id,
                        config_sha256=self.config.sha256(),
                        model=arrays,
                        strategy_state=self.strategy.state(),
                        history=history,
                    ),
                )
                if settings.stop_after_round is not None and rnd >= settings.stop_after_round:
                    log.warning("stopping after round %d as asked", rnd)
                    return {"completed": False, "history": history, "arrays": arrays}
        finally:
            ledger.close()
        return {"completed": True, "history": history, "arrays": arrays}

    def _restore(self) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], int]:
        checkpoint = load_latest(self.settings.checkpoints)
        if checkpoint is None:
            return initial_model(self.config), [], 1
        if checkpoint.config_sha256 != self.config.sha256():
            from common.errors import CheckpointError

            raise CheckpointError(
                f"checkpoint in {self.settings.checkpoints} was written with another configuration"
            )
        self.strategy.load_state(checkpoint.strategy_state)
        log.info("resuming run %s after round %d", checkpoint.run_id, checkpoint.round)
        return checkpoint.model, checkpoint.history, checkpoint.round + 1

    def _one_round(
        self,
        arrays: dict[str, np.ndarray],
        rnd: int,
        ledger: ServerLedger,
        history: list[dict[str, Any]],
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        began = time.perf_counter()
        outcome = self.run_round(arrays, rnd, ledger)
        aggregated = len(outcome.updates) >= self.config.federation.min_merchants
        if aggregated:
            arrays = self.strategy.aggregate(arrays, outcome.updates)
        else:
            log.error(
                "round %d: only %d usable updates (< %d): global model unchanged",
                rnd,
                len(outcome.updates),
                self.config.federation.min_merchants,
            )
        overall, per_merchant = self.evaluate(arrays, self.validation)
        previous = history[-1]["epsilon"] if history else {}
        epsilon = {**previous, **outcome.epsilon}
        row = {
            "round": rnd,
            "aggregated": aggregated,
            "trained": sorted(u.merchant_id for u in outcome.updates),
            "refused": outcome.refused,
            "failed": outcome.failed,
            "train_loss": float(np.mean(list(outcome.losses.values()))) if outcome.losses else None,
            "metrics": overall,
            "merchant_metrics": per_merchant,
            "epsilon": epsilon,
            "epsilon_max": max(epsilon.values()) if epsilon else 0.0,
            "seconds": time.perf_counter() - began,
        }
        log.info(
            "round %d/%d: %d trained, %d refused, %d failed | loss %s | %s | eps max %.3f | %.1fs",
            rnd,
            self.config.federation.rounds,
            len(outcome.updates),
            len(outcome.refused),
            len(outcome.failed),
            f"{row['train_loss']:.4f}" if row["train_loss"] is not None else "-",
            " ".join(f"{k} {v:.4f}" for k, v in overall.items()),
            row["epsilon_max"],
            row["seconds"],
        )
        return arrays, row


def write_final_model(run_dir: Path, arrays: dict[str, np.ndarray]) -> str:
    atomic_write_bytes(run_dir / "model" / "final.npz", arrays_to_npz(arrays))
    digest = arrays_sha256(arrays)
    atomic_write_bytes(
        run_dir / "model" / "final.json", json.dumps({"arrays_sha256": digest}, indent=1).encode()
    )
    return digest
