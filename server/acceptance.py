"""The platform's acceptance policy: one reply in, an accepted update, a refusal or a failure out.

Every transport (Flower's simulation and deployment grids, the in-process grid of the
benchmarks) delivers replies here; nothing else decides what enters an aggregate. An update
is accepted only if its arrays have the global model's names and shapes and the run's update
dtype (float32, or float16 with ``federation.update_dtype``), are finite and within the
update-norm bound (server/update_checks.py), all checked on the arrays as received, and its
signed ledger entry (with the backlog of earlier entries the platform lacks) verifies:
signature, chain, what was asked, the hash of the weights received (in the dtype received),
and the epsilon it states, recomputed from the merchant's history (common/ledger/claims.py).
A float16 update is aggregated exactly (server/strategies.py upcasts every value). The FedAvg
weight is the signed ``dataset_size``, which the platform bounds by the sample rate and batch
size the merchant signed with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from flwr.app import Message

from common.arrays_io import arrays_sha256
from common.config import RunConfig
from common.errors import FedshopError, IntegrityError
from common.keys import load_verify_key
from common.ledger import ExpectedRelease, PrivacyRelease, ServerLedger
from common.protocol import FailureCode, MerchantReply, Outcome
from server.update_checks import RejectedUpdateError, check_update

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class AcceptedUpdate:
    merchant_id: str
    arrays: Arrays
    weight: int  # records the update was trained on (signed, bounded)
    epsilon: float | None  # None for a non-private baseline round


@dataclass(frozen=True)
class Refusal:
    merchant_id: str
    code: str  # a RefusalCode value
    reason: str


@dataclass(frozen=True)
class Failure:
    merchant_id: str
    code: str  # a FailureCode value
    reason: str


Decision = AcceptedUpdate | Refusal | Failure


@dataclass(frozen=True)
class RoundContext:
    """What the platform sent this round: the terms every reply is checked against."""

    config: RunConfig
    run_id: str
    round: int
    arrays: Arrays
    keys_dir: Path  # merchants' Ed25519 public keys: <merchant-id>.pub

    @cached_property  # once per round, not once per reply
    def model_sha256(self) -> str:
        return arrays_sha256(self.arrays)

    def expected(self) -> ExpectedRelease:
        privacy = self.config.privacy
        return ExpectedRelease(
            run_id=self.run_id,
            round=self.round,
            model_in_sha256=self.model_sha256,
            clipping_norm=privacy.clipping_norm,
            max_delta=privacy.delta,
            max_epsilon=privacy.epsilon_cap,
            min_noise_multiplier=privacy.noise_multiplier or 0.0,
        )


def size_problem(release: PrivacyRelease, *, batch_size: int) -> str | None:
    """A merchant samples with q = 1 / ceil(N / batch): N must agree with the q it signed."""
    batches = math.ceil(release.dataset_size / batch_size)
    if abs(batches * release.sample_rate - 1.0) > 1e-9:
        return (
            f"dataset_size {release.dataset_size} does not match sample_rate "
            f"{release.sample_rate:.6g} at batch size {batch_size} (expected q = 1/{batches})"
        )
    return None


def accept_reply(reply: MerchantReply, context: RoundContext, ledger: ServerLedger) -> Decision:
    """The decision for one decoded reply; the ledger keeps the entries of accepted ones."""
    merchant = reply.merchant_id
    if reply.outcome is Outcome.REFUSED:
        return Refusal(merchant, reply.code, reply.reason)
    if reply.outcome is Outcome.FAILED or reply.arrays is None:
        return Failure(merchant, reply.code or FailureCode.ERROR.value, reply.reason)
    try:
        federation = context.config.federation
        check_update(
            reply.arrays,
            context.arrays,
            max_update_norm=federation.max_update_norm,
            dtype=federation.update_dtype,
        )
        if not context.config.privacy.enabled:  # a baseline run: nothing to verify or account
            weight = int(reply.metrics.get("num-examples", 0))
            if weight < 1:
                raise RejectedUpdateError("a non-private update needs num-examples >= 1")
            return AcceptedUpdate(merchant, reply.arrays, weight, None)
        if reply.ledger_entry is None:
            raise RejectedUpdateError("a DP update must carry its signed ledger entry")
        entry = ledger.accept(
            reply.ledger_entry,
            verify_key=load_verify_key(context.keys_dir / f"{merchant}.pub"),
            expected=context.expected(),
            model_out_sha256=arrays_sha256(reply.arrays),
            merchant_id=merchant,
            backlog=reply.ledger_backlog,
        )
    except FedshopError as exc:
        return Failure(merchant, FailureCode.REJECTED.value, f"update rejected: {exc.one_line()}")
    problem = size_problem(entry.release, batch_size=context.config.training.batch_size)
    if problem is not None:  # the entry verified and is kept: the spend happened
        return Failure(merchant, FailureCode.REJECTED.value, f"update rejected: {problem}")
    return AcceptedUpdate(
        merchant, reply.arrays, entry.release.dataset_size, entry.release.epsilon_after
    )


def decide(
    message: Message, context: RoundContext, ledger: ServerLedger, *, sender: str
) -> Decision:
    """The decision for one Flower reply; ``sender`` names the node for error replies."""
    if message.has_error():
        return Failure(
            sender, FailureCode.ERROR_REPLY.value, short_reason(str(message.error.reason))
        )
    try:
        reply = MerchantReply.from_content(message.content)
    except IntegrityError as exc:
        return Failure(sender, FailureCode.REJECTED.value, f"unreadable reply: {exc.one_line()}")
    return accept_reply(reply, context, ledger)


def short_reason(text: str, limit: int = 300) -> str:
    """The last meaningful line of a remote traceback, without terminal colours."""
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("File ", "^", "~"))]
    return (useful[-1] if useful else text)[:limit]
