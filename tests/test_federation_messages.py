"""The message layer end to end in one process: the real ClientApp, Flower's Message encoding,
the platform's round loop and its one acceptance path, with a grid that can lose replies."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flwr.app import ConfigRecord

from client.app import app as client_app
from common import protocol as P
from common.arrays_io import arrays_sha256
from common.config import RunConfig
from common.ledger import ServerLedger
from common.protocol import FailureCode, MerchantReply, Outcome, RefusalCode, TrainInstruction
from server.acceptance import AcceptedUpdate, RoundContext, accept_reply
from server.federation import Federation, initial_model
from simulations.inprocess import InProcessGrid, simulation_grid
from simulations.online import StreamSpec, WeeklyStream, deliver_week, enable_inboxes
from simulations.provision import load_events
from simulations.runner import server_settings


class LossyGrid(InProcessGrid):
    """Replies of ``lose`` nodes vanish once (the merchant released, the platform never heard);
    ``silent`` nodes never answer; every pushed message is kept for inspection."""

    def __init__(self, base: InProcessGrid) -> None:
        super().__init__(base.client_app, [c.node_config for c in base.contexts.values()])
        self.lose: set[int] = set()
        self.silent: set[int] = set()
        self.pushed: list = []

    def push_messages(self, messages):
        messages = list(messages)
        self.pushed.extend(messages)
        ids = list(super().push_messages(messages))
        for message_id, message in zip(ids, messages, strict=True):
            node = message.metadata.dst_node_id
            if node in self.lose or node in self.silent:
                self._replies.pop(message_id, None)
        self.lose.clear()
        return ids


@pytest.fixture
def federation(small_layout):
    settings = server_settings(small_layout)
    grid = LossyGrid(simulation_grid(client_app, len(small_layout.merchant_ids())))
    config = dataclasses.replace(
        settings.config,
        federation=dataclasses.replace(settings.config.federation, round_timeout_s=0.5),
    )
    fed = Federation(grid, dataclasses.replace(settings, config=config, node_wait_s=0.0))
    ledger = ServerLedger.open(settings.ledger_path)
    yield small_layout, fed, grid, ledger
    ledger.close()


def _seq_sent(message) -> int:
    config = message.content[P.CONFIG]
    assert isinstance(config, ConfigRecord)
    return int(config[P.SERVER_LEDGER_SEQ])


def test_each_node_gets_only_its_own_seq_and_no_seed(federation):
    layout, fed, grid, ledger = federation
    arrays = initial_model(fed.config)
    fed.run_round(arrays, 1, ledger)
    assert {_seq_sent(m) for m in grid.pushed} == {P.UNKNOWN_SEQ}  # nobody known yet
    grid.pushed.clear()
    fed.run_round(arrays, 2, ledger)
    for message in grid.pushed:
        config = message.content[P.CONFIG]
        merchant = fed.merchant_of[message.metadata.dst_node_id]
        assert _seq_sent(message) == ledger.last_seq(merchant) - 1  # its own, before round 2
        assert "seed" not in config and "server-ledger-seqs" not in config
        others = set(layout.merchant_ids()) - {merchant}
        assert not any(name in json.dumps(dict(config)) for name in others)


def test_a_release_the_platform_missed_arrives_as_backlog_on_the_next_finetune(
    small_layout, federation
):
    layout, fed, grid, ledger = federation
    spec = StreamSpec(41, 42)
    enable_inboxes(layout, spec)
    stream = WeeklyStream(load_events(RunConfig.from_toml(layout.config)))
    arrays = initial_model(fed.config)
    fed.run_round(arrays, 1, ledger)  # offline round: every node known
    victim = 1
    name = fed.merchant_of[victim]
    deliver_week(layout, stream, 41, layout.merchant_ids())
    grid.lose = {victim}
    lost = fed.run_round(arrays, 2, ledger, message_type=P.FINETUNE, planned_rounds=1)
    assert name not in lost.updates and name in lost.failed
    assert lost.failure_codes[name] == FailureCode.NO_REPLY.value
    assert ledger.last_seq(name) == 1  # the platform lacks the merchant's seq 2

    deliver_week(layout, stream, 42, layout.merchant_ids())
    caught_up = fed.run_round(arrays, 3, ledger, message_type=P.FINETUNE, planned_rounds=1)
    assert name in [u.merchant_id for u in caught_up.updates], caught_up.failed
    assert ledger.last_seq(name) == 3  # seq 2 came as backlog with seq 3, both verified
    assert [e.release.round for e in ledger.entries(name)] == [1, 2, 3]


def test_refusals_failures_and_silence_are_sorted_by_code_and_named(federation):
    layout, fed, grid, ledger = federation
    arrays = initial_model(fed.config)
    fed.run_round(arrays, 1, ledger)  # learn who is who
    names = {node: fed.merchant_of[node] for node in (1, 2, 3)}
    # merchant 2 cannot pay another round at its cap; merchant 3 goes silent
    toml = layout.merchants / names[2] / "merchant.toml"
    toml.write_text(toml.read_text().replace("epsilon_cap = 3.0", "epsilon_cap = 0.01"))
    grid.silent = {3}
    outcome = fed.run_round(arrays, 2, ledger)
    assert [u.merchant_id for u in outcome.updates] == [names[1]]
    assert outcome.refusal_codes == {names[2]: RefusalCode.BUDGET.value}
    assert outcome.failure_codes == {names[3]: FailureCode.NO_REPLY.value}


def test_an_update_past_the_norm_bound_is_rejected_but_its_spend_is_kept(federation):
    _layout, fed, _grid, ledger = federation
    tight = dataclasses.replace(
        fed.config, federation=dataclasses.replace(fed.config.federation, max_update_norm=1e-9)
    )
    fed.config = tight
    outcome = fed.run_round(initial_model(tight), 1, ledger)
    assert not outcome.updates
    assert set(outcome.failure_codes.values()) == {FailureCode.REJECTED.value}
    assert all("update norm" in reason for reason in outcome.failed.values())


def test_a_client_app_that_raises_is_a_named_failure(federation, monkeypatch):
    layout, fed, _grid, ledger = federation
    arrays = initial_model(fed.config)
    fed.run_round(arrays, 1, ledger)
    import client.merchant_round

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(client.merchant_round, "run_merchant_round", boom)
    outcome = fed.run_round(arrays, 2, ledger)
    assert set(outcome.failure_codes.values()) == {FailureCode.ERROR_REPLY.value}
    assert set(outcome.failed) == set(layout.merchant_ids())  # named, not node-N
    assert all("disk on fire" in reason for reason in outcome.failed.values())


def test_reply_encoding_round_trip_and_acceptance_with_backlog(small_layout, tmp_path):
    """TrainReply -> RecordDict -> decode -> acceptance, for a backlog of one missed entry."""
    from client.merchant_round import run_merchant_round

    settings = server_settings(small_layout)
    merchant = small_layout.merchant_config(small_layout.merchant_ids()[0])
    arrays = initial_model(settings.config)

    def instruction(rnd: int, seq: int) -> TrainInstruction:
        return TrainInstruction(
            run_id=settings.run_id,
            round=rnd,
            planned_rounds=settings.config.federation.rounds,
            config=settings.config,
            arrays=arrays,
            model_in_sha256=arrays_sha256(arrays),
            server_ledger_seq=seq,
        )

    run_merchant_round(instruction(1, P.UNKNOWN_SEQ), merchant)  # the platform never saw it
    reply = run_merchant_round(instruction(2, 0), merchant)
    decoded = MerchantReply.from_content(reply.to_content())
    assert decoded.ledger_backlog == reply.ledger_backlog and len(decoded.ledger_backlog) == 1
    assert decoded.outcome is Outcome.TRAINED and "train-loss" not in decoded.metrics
    np.testing.assert_array_equal(
        decoded.arrays["repeat_out.weight"],
        reply.arrays["repeat_out.weight"],  # type: ignore[index]
    )
    with ServerLedger.open(tmp_path / "server.sqlite") as ledger:
        context = RoundContext(
            config=settings.config,
            run_id=settings.run_id,
            round=2,
            arrays=arrays,
            keys_dir=small_layout.keys,
        )
        decision = accept_reply(decoded, context, ledger)
        assert isinstance(decision, AcceptedUpdate), decision
        assert ledger.last_seq(merchant.id) == 2


def test_a_node_that_fails_before_it_ever_replied_is_named_as_registered(federation, monkeypatch):
    """Deployment registers nodes under the merchant's name; a merchant whose first message
    already fails is reported under that name, not as node-N."""
    from flwr.proto.node_pb2 import NodeInfo

    import client.merchant_round

    layout, fed, grid, ledger = federation
    names = dict(zip([1, 2, 3], layout.merchant_ids(), strict=True))
    monkeypatch.setattr(
        grid, "get_nodes", lambda: [NodeInfo(node_id=n, name=m) for n, m in names.items()]
    )

    def boom(*args, **kwargs):
        raise RuntimeError("no disk")

    monkeypatch.setattr(client.merchant_round, "run_merchant_round", boom)
    outcome = fed.run_round(initial_model(fed.config), 1, ledger)
    assert set(outcome.failed) == set(names.values())


def test_a_float16_reply_is_accepted_aggregated_and_its_ledger_hashes_what_was_sent(
    small_layout, tmp_path
):
    """With federation.update_dtype = float16 the merchant releases float16 weights: its
    signed entry hashes exactly the arrays that travel (through Flower's protobuf encoding),
    the platform checks and verifies what it received, and aggregates it exactly."""
    from flwr.common import serde

    from client.merchant_round import run_merchant_round
    from common.config import UpdateDtype
    from common.ledger import LedgerEntry
    from server.strategies import MerchantUpdate, RunningSum

    settings = server_settings(small_layout)
    federation = dataclasses.replace(settings.config.federation, update_dtype=UpdateDtype.FLOAT16)
    config = dataclasses.replace(settings.config, federation=federation)
    arrays = initial_model(config)
    instruction = TrainInstruction(
        run_id=settings.run_id,
        round=1,
        planned_rounds=config.federation.rounds,
        config=config,
        arrays=arrays,
        model_in_sha256=arrays_sha256(arrays),
    )
    context = RoundContext(
        config=config, run_id=settings.run_id, round=1, arrays=arrays, keys_dir=small_layout.keys
    )
    folded, sent_arrays = RunningSum(), []
    with ServerLedger.open(tmp_path / "server.sqlite") as ledger:
        for merchant_id in small_layout.merchant_ids()[:2]:
            reply = run_merchant_round(instruction, small_layout.merchant_config(merchant_id))
            wire = serde.recorddict_to_proto(reply.to_content())
            decoded = MerchantReply.from_content(serde.recorddict_from_proto(wire))
            assert decoded.arrays is not None
            assert {a.dtype for a in decoded.arrays.values()} == {np.dtype(np.float16)}
            as_float32 = {k: v.astype(np.float32) for k, v in decoded.arrays.items()}
            wide = serde.recorddict_to_proto(
                dataclasses.replace(reply, arrays=as_float32).to_content()
            )
            assert wire.ByteSize() < 0.6 * wide.ByteSize()  # the weights take half the bytes

            signed = LedgerEntry.from_wire(decoded.ledger_entry).release.model_out_sha256
            assert signed == arrays_sha256(decoded.arrays) != arrays_sha256(as_float32)
            name = next(iter(decoded.arrays))
            nudged = {**decoded.arrays, name: np.nextafter(decoded.arrays[name], np.float16(9))}
            tampered = accept_reply(dataclasses.replace(decoded, arrays=nudged), context, ledger)
            assert tampered.code == FailureCode.REJECTED.value and "sha256" in tampered.reason

            decision = accept_reply(decoded, context, ledger)
            assert isinstance(decision, AcceptedUpdate), decision
            assert ledger.entries(merchant_id)[-1].release.model_out_sha256 == signed
            folded.add(MerchantUpdate(merchant_id, decision.arrays, decision.weight))
            sent_arrays.append((decoded.arrays, decision.weight))
    mean = folded.mean()
    total = sum(weight for _, weight in sent_arrays)
    for name in arrays:
        exact = sum(a[name].astype(np.float64) * w for a, w in sent_arrays) / total
        assert mean[name].dtype == np.float32
        np.testing.assert_array_equal(mean[name], exact.astype(np.float32))
