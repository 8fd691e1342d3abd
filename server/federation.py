"""The platform's round loop on top of Flower's Grid (Message API).

Per round: send the global model to every connected merchant, a bounded window of messages at
a time, pass each reply through the acceptance policy (server/acceptance.py) as it arrives and
fold an accepted update into the running weighted sum at once (server/strategies.py), so the
platform's memory does not grow with the number of merchants; then aggregate,
have the merchants evaluate the new model on their own held-out events (federated
evaluation), checkpoint. The round goes on while enough merchants remain.

What a node receives: the model, the run's configuration, and the last ledger sequence number
the platform holds for that node's own merchant (learnt from its earlier replies); never a
seed for its DP randomness and never another merchant's state.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from common import protocol as P
from common.arrays_io import arrays_sha256, arrays_to_npz
from common.atomic import atomic_write_bytes, atomic_write_json
from common.config import RunConfig
from common.errors import CheckpointError
from common.ledger import ServerLedger
from common.nextbasket.model import BasketScorer, shared_arrays
from common.protocol import EvalPart, EvaluateInstruction, TrainInstruction
from common.rng import derive_seed
from server.acceptance import AcceptedUpdate, Failure, Refusal, RoundContext, decide
from server.checkpoint import Checkpoint, load_latest, save_checkpoint
from server.exchange import stream_exchange
from server.federated_evaluation import EvaluationOutcome, federated_evaluate
from server.strategies import MerchantUpdate, RunningSum, build_strategy

log = logging.getLogger(__name__)

GLOBAL = "global"  # the label of the global model in evaluation instructions
LOGGED = ("ndcg@10", "recall@10", "ndcg@20")  # the figures of the per-round log line


@dataclass(frozen=True)
class ServerSettings:
    config: RunConfig
    run_dir: Path
    keys_dir: Path  # merchants' Ed25519 public keys: <merchant-id>.pub
    ledger_path: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    simulation_dir: Path | None = None
    stop_after_round: int | None = None  # stop early (to exercise --resume)
    node_wait_s: float = 120.0
    # Messages pushed and not yet answered (None: no limit). A deployment's SuperLink keeps
    # them in its own database; Flower's simulation engine keeps them in the platform's
    # process, each with a copy of the model, so simulations bound them (simulations/runner.py).
    max_in_flight: int | None = None

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def initial_model(config: RunConfig) -> dict[str, np.ndarray]:
    """The public starting point: every party can rebuild it from the run seed."""
    torch.manual_seed(derive_seed(config.seed, "initial-model") % (2**31))
    return dict(shared_arrays(BasketScorer(config.model)))


@dataclass
class RoundOutcome:
    """A round's decisions. Accepted updates are folded into ``updates`` (a running weighted
    sum) as they arrive, so the outcome holds no merchant's arrays."""

    updates: RunningSum = field(default_factory=RunningSum)
    epsilon: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    refusal_codes: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    failure_codes: dict[str, str] = field(default_factory=dict)

    def add(self, decision: AcceptedUpdate | Refusal | Failure) -> None:
        if isinstance(decision, AcceptedUpdate):
            self.updates.add(MerchantUpdate(decision.merchant_id, decision.arrays, decision.weight))
            if decision.epsilon is not None:
                self.epsilon[decision.merchant_id] = decision.epsilon
        elif isinstance(decision, Refusal):
            self.refused[decision.merchant_id] = decision.reason
            self.refusal_codes[decision.merchant_id] = decision.code
        else:
            self.failed[decision.merchant_id] = decision.reason
            self.failure_codes[decision.merchant_id] = decision.code


class Federation:
    def __init__(self, grid: Grid, settings: ServerSettings) -> None:
        self.grid = grid
        self.settings = settings
        self.config = settings.config
        self.strategy = build_strategy(self.config.federation)
        self.merchant_of: dict[int, str] = {}  # node id -> merchant id, learnt from replies
        self.registered_as: dict[int, str] = {}  # node id -> name the operator registered

    # -- nodes -------------------------------------------------------------------
    def nodes(self) -> list[int]:
        """The connected nodes, once at least ``min_merchants`` are there (or the wait ends)."""
        deadline = time.monotonic() + self.settings.node_wait_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.config.federation.min_merchants or time.monotonic() > deadline:
                self._learn_registered_names()
                return nodes
            time.sleep(1.0)

    def _learn_registered_names(self) -> None:
        """The names nodes were allow-listed under (``flwr supernode register --name``), so a
        merchant that fails before it ever replied is still named."""
        try:
            infos = list(self.grid.get_nodes())
        except Exception:  # a grid that cannot list node details: names come from replies
            return
        for info in infos:
            name = str(getattr(info, "name", "") or "")
            if name:
                self.registered_as[int(info.node_id)] = name

    def name_of(self, node: int) -> str:
        return self.merchant_of.get(node) or self.registered_as.get(node) or f"node-{node}"

    def _learn(self, replies: list[Message]) -> None:
        for reply in replies:
            if reply.has_error() or P.STATUS not in reply.content:
                continue
            status = reply.content[P.STATUS]
            merchant = status.get(P.MERCHANT_ID) if hasattr(status, "get") else None
            if merchant:
                self.merchant_of[reply.metadata.src_node_id] = str(merchant)

    # -- one training round --------------------------------------------------------
    def _instruction(
        self, context: RoundContext, node: int, ledger: ServerLedger, planned: int
    ) -> TrainInstruction:
        merchant = self.merchant_of.get(node)
        return TrainInstruction(
            run_id=self.settings.run_id,
            round=context.round,
            planned_rounds=planned,
            config=self.config,
            arrays=context.arrays,
            model_in_sha256=context.model_sha256,
            server_ledger_seq=ledger.last_seq(merchant) if merchant else P.UNKNOWN_SEQ,
            simulation_dir=None
            if self.settings.simulation_dir is None
            else str(self.settings.simulation_dir),
        )

    def run_round(
        self,
        arrays: dict[str, np.ndarray],
        rnd: int,
        ledger: ServerLedger,
        *,
        message_type: str = P.TRAIN,
        planned_rounds: int | None = None,
    ) -> RoundOutcome:
        """Send ``arrays`` to every connected merchant (``message_type`` picks the ClientApp
        action, e.g. ``train.finetune``) and sort the replies into usable updates, refusals
        and failures."""
        nodes = self.nodes()
        planned = planned_rounds or self.config.federation.rounds
        context = RoundContext(
            config=self.config,
            run_id=self.settings.run_id,
            round=rnd,
            arrays=arrays,
            keys_dir=self.settings.keys_dir,
        )
        outcome = RoundOutcome()

        def decide_and_fold(reply: Message) -> None:
            # checked (acceptance policy) before its arrays are folded in, then dropped
            self._learn([reply])
            sender = self.name_of(reply.metadata.src_node_id)
            outcome.add(decide(reply, context, ledger, sender=sender))

        messages = (  # built as the window opens: one model copy per message in flight
            Message(
                content=self._instruction(context, node, ledger, planned).to_content(),
                message_type=message_type,
                dst_node_id=node,
            )
            for node in nodes
        )
        sent = stream_exchange(
            self.grid,
            messages,
            on_reply=decide_and_fold,
            timeout_s=self.config.federation.round_timeout_s,
            max_in_flight=self.settings.max_in_flight,
        )
        for node in sent.restarted:
            outcome.add(
                Failure(
                    self.name_of(node),
                    P.FailureCode.RESTARTED.value,
                    "restarted mid-round; the model it held was lost",
                )
            )
        for node in sent.unanswered:
            outcome.add(
                Failure(
                    self.name_of(node),
                    P.FailureCode.NO_REPLY.value,
                    f"no reply in {self.config.federation.round_timeout_s:g} s",
                )
            )
        for merchant, reason in sorted(outcome.refused.items()):
            log.warning("round %d: merchant %s refused: %s", rnd, merchant, reason)
        for merchant, reason in sorted(outcome.failed.items()):
            log.warning("round %d: merchant %s dropped: %s", rnd, merchant, reason)
        return outcome

    # -- federated evaluation -------------------------------------------------------
    def evaluate(
        self,
        models: dict[str, dict[str, np.ndarray]],
        tasks: tuple[tuple[EvalPart, str], ...],
        *,
        rnd: int,
    ) -> EvaluationOutcome:
        """Have every connected merchant score ``models`` on its own held-out events."""
        instruction = EvaluateInstruction(
            run_id=self.settings.run_id,
            round=rnd,
            config=self.config,
            models=models,
            tasks=tasks,
            simulation_dir=None
            if self.settings.simulation_dir is None
            else str(self.settings.simulation_dir),
        )
        return federated_evaluate(
            self.grid,
            self.nodes(),
            instruction,
            timeout_s=self.config.federation.round_timeout_s,
            name_of=self.name_of,
            max_in_flight=self.settings.max_in_flight,
        )

    # -- the run -----------------------------------------------------------------
    def run(self, ledger: ServerLedger) -> dict[str, Any]:
        """Offline rounds from the last checkpoint; returns the history and final arrays."""
        settings = self.settings
        arrays, history, start = self._restore()
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
        return {"completed": True, "history": history, "arrays": arrays}

    def _restore(self) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], int]:
        checkpoint = load_latest(self.settings.checkpoints)
        if checkpoint is None:
            return initial_model(self.config), [], 1
        if checkpoint.config_sha256 != self.config.sha256():
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
        evaluation = (
            self.evaluate({GLOBAL: arrays}, ((EvalPart.VALIDATION, GLOBAL),), rnd=rnd)
            if self.config.evaluation.every_round
            else EvaluationOutcome()
        )
        overall = evaluation.means(EvalPart.VALIDATION, GLOBAL)
        previous = history[-1]["epsilon"] if history else {}
        epsilon = dict(sorted({**previous, **outcome.epsilon}.items()))
        row = {
            "round": rnd,
            "aggregated": aggregated,
            "trained": sorted(u.merchant_id for u in outcome.updates),
            "refused": dict(sorted(outcome.refused.items())),
            "refusal_codes": dict(sorted(outcome.refusal_codes.items())),
            "failed": dict(sorted(outcome.failed.items())),
            "failure_codes": dict(sorted(outcome.failure_codes.items())),
            "metrics": overall,
            "evaluation_cases": evaluation.cases(EvalPart.VALIDATION, GLOBAL),
            "merchant_metrics": evaluation.per_merchant(EvalPart.VALIDATION, GLOBAL),
            "epsilon": epsilon,
            "epsilon_max": max(epsilon.values()) if epsilon else 0.0,
            "seconds": time.perf_counter() - began,
        }
        log.info(
            "round %d/%d: %d trained, %d refused, %d failed | %s | eps max %.3f | %.1fs",
            rnd,
            self.config.federation.rounds,
            len(outcome.updates),
            len(outcome.refused),
            len(outcome.failed),
            " ".join(f"{k} {overall[k]:.4f}" for k in LOGGED if k in overall) or "no evaluation",
            row["epsilon_max"],
            row["seconds"],
        )
        return arrays, row


def write_final_model(run_dir: Path, arrays: dict[str, np.ndarray]) -> str:
    atomic_write_bytes(run_dir / "model" / "final.npz", arrays_to_npz(arrays))
    digest = arrays_sha256(arrays)
    atomic_write_json(run_dir / "model" / "final.json", {"arrays_sha256": digest})
    return digest
