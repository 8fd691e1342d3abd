"""Publishing versions to merchants: the platform signs, the merchant verifies with its pinned key.

The server's messages go through the merchant's real handler (client/publish.py) in-process, over
a loopback grid that hands each pushed message to the merchant its node id names."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity

from client.merchant import MerchantConfig
from client.model_mirror import ModelMirror
from client.publish import open_mirror, publication_reply
from common import protocol as P
from common.errors import IntegrityError
from common.keys import generate_keypair, load_signing_key, load_verify_key
from common.publication import (
    PUBLICATION_KEY,
    ModelDescriptor,
    PublishOutcome,
    manifest_key,
    verify_publication,
    weights_key,
)
from server.publish import Publisher, publish, publish_messages, read_replies
from server.registry import ModelRegistry

MODEL = ModelDescriptor("test-model", {"width": 3})


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the running task's ids; give the test process some."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture()
def platform(tmp_path: Path) -> SimpleNamespace:
    private, public = generate_keypair(tmp_path / "platform", name="platform")
    key = load_signing_key(private)
    registry = ModelRegistry(tmp_path / "registry", signing_key=key, verify_key=key.public_key())
    ids = [
        registry.register(
            weights(seed), parent=None, round=seed, merchants=[], metrics={}, privacy={}
        ).id
        for seed in (1, 2, 3)
    ]
    registry.promote(ids[0], reason="first")
    return SimpleNamespace(
        key=key,
        public=public,
        registry=registry,
        ids=ids,
        publisher=Publisher(registry, key, model=MODEL),
    )


def merchant(tmp_path: Path, name: str, platform_key: Path | None) -> MerchantConfig:
    home = tmp_path / name
    return MerchantConfig(
        id=name,
        data=home / "events.parquet",
        state_dir=home / "state",
        signing_key=home / f"{name}.key",
        platform_key=platform_key,
    )


def deliver(config: ConfigRecord, who: MerchantConfig) -> dict[str, Any]:
    status = publication_reply(config, who)[P.STATUS]
    assert isinstance(status, ConfigRecord)
    return dict(status)


def test_merchant_installs_the_serving_version_and_answers(platform, tmp_path: Path) -> None:
    shop = merchant(tmp_path, "m1", platform.public)
    signed = platform.publisher.sign(reason="offline model")
    (message,) = publish_messages(signed, [5])
    assert message.metadata.message_type == "query.publish"
    status = deliver(message.content[P.CONFIG], shop)
    assert status[P.OUTCOME] == PublishOutcome.INSTALLED and status["serving"] == platform.ids[0]
    mirror = open_mirror(shop)
    assert mirror.publication() == verify_publication(
        signed.envelope, platform.key.public_key(), source="test"
    )
    np.testing.assert_array_equal(mirror.load(platform.ids[0]).arrays["w"], weights(1)["w"])
    # The same publication again (a retried message) changes nothing and is not refused.
    again = deliver(message.content[P.CONFIG], shop)
    assert again[P.OUTCOME] == PublishOutcome.INSTALLED


def test_rollback_is_a_newer_publication_and_a_replay_is_refused(platform, tmp_path: Path) -> None:
    shop = merchant(tmp_path, "m1", platform.public)
    first = platform.publisher.sign(reason="v1")
    platform.registry.promote(platform.ids[1], reason="better")
    second = platform.publisher.sign(reason="v2")
    platform.registry.rollback(reason="worse online")
    third = platform.publisher.sign(reason="rolled back")
    assert [p.publication.serial for p in (first, second, third)] == [1, 2, 3]
    assert third.publication.serving == platform.ids[0]
    for signed in (first, second, third):
        assert deliver(signed.config(), shop)[P.OUTCOME] == PublishOutcome.INSTALLED
    replay = deliver(second.config(), shop)
    assert replay[P.OUTCOME] == PublishOutcome.REFUSED
    assert "serial 2 is not newer than serial 3" in replay[P.REASON]
    assert open_mirror(shop).publication().serving == platform.ids[0]  # type: ignore[union-attr]
    assert [row[:3] for row in platform.publisher.history()] == [
        (1, 1, None),
        (2, 2, None),
        (3, 1, None),
    ]


def test_a_version_that_fails_verification_is_refused_and_nothing_changes(
    platform, tmp_path: Path
) -> None:
    shop = merchant(tmp_path, "m1", platform.public)
    deliver(platform.publisher.sign(reason="v1").config(), shop)
    platform.registry.promote(platform.ids[1], reason="better")
    signed = platform.publisher.sign(reason="v2")
    v2 = platform.ids[1]

    tampered = dict(signed.config())
    raw = bytearray(tampered[weights_key(v2)])  # type: ignore[arg-type]
    raw[-40] ^= 0xFF
    tampered[weights_key(v2)] = bytes(raw)
    status = deliver(ConfigRecord(tampered), shop)  # type: ignore[arg-type]
    assert status[P.OUTCOME] == PublishOutcome.REFUSED and "SHA-256" in status[P.REASON]

    forged = dict(signed.config())
    envelope = json.loads(forged[manifest_key(v2)])  # type: ignore[arg-type]
    envelope["manifest"]["metrics"] = {"ndcg@10": 0.99}
    forged[manifest_key(v2)] = json.dumps(envelope).encode()
    status = deliver(ConfigRecord(forged), shop)  # type: ignore[arg-type]
    assert status[P.OUTCOME] == PublishOutcome.REFUSED and "does not verify" in status[P.REASON]

    mirror = open_mirror(shop)
    assert mirror.publication().serving == platform.ids[0]  # type: ignore[union-attr]
    assert not (mirror.versions_dir / f"v{v2:06d}.npz").exists()  # nothing half-installed
    assert deliver(signed.config(), shop)[P.OUTCOME] == PublishOutcome.INSTALLED


def test_only_the_pinned_key_is_trusted(platform, tmp_path: Path) -> None:
    _, other = generate_keypair(tmp_path / "other", name="other")
    pinned_elsewhere = merchant(tmp_path, "m2", other)
    status = deliver(platform.publisher.sign(reason="v1").config(), pinned_elsewhere)
    assert status[P.OUTCOME] == PublishOutcome.REFUSED and "does not verify" in status[P.REASON]
    unpinned = merchant(tmp_path, "m3", None)
    status = deliver(platform.publisher.sign(reason="v1").config(), unpinned)
    assert status[P.OUTCOME] == PublishOutcome.REFUSED and "platform_key" in status[P.REASON]

    impostor = Ed25519PrivateKey.generate()
    with pytest.raises(IntegrityError, match="does not match"):
        Publisher(platform.registry, impostor, model=MODEL)


def test_candidate_travels_with_the_serving_version(platform, tmp_path: Path) -> None:
    shop = merchant(tmp_path, "m1", platform.public)
    signed = platform.publisher.sign(reason="A/B", candidate=platform.ids[2])
    assert deliver(signed.config(), shop)[P.OUTCOME] == PublishOutcome.INSTALLED
    mirror = open_mirror(shop)
    held = mirror.publication()
    assert held is not None and held.versions() == (platform.ids[0], platform.ids[2])
    assert held.model == MODEL
    np.testing.assert_array_equal(mirror.load(platform.ids[2]).arrays["w"], weights(3)["w"])


def test_files_edited_in_the_mirror_are_refused_on_load(platform, tmp_path: Path) -> None:
    shop = merchant(tmp_path, "m1", platform.public)
    deliver(platform.publisher.sign(reason="v1").config(), shop)
    mirror = ModelMirror(shop.models_dir, verify_key=load_verify_key(platform.public))
    path = mirror.versions_dir / f"v{platform.ids[0]:06d}.npz"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError, match="SHA-256") as raised:
        mirror.load(platform.ids[0])
    assert str(path) in str(raised.value)  # names the file that changed, not its manifest
    # A publication that needs a version the mirror holds only corrupted is refused too.
    signed = platform.publisher.sign(reason="again")
    bare = ConfigRecord({PUBLICATION_KEY: signed.envelope})
    assert deliver(bare, shop)[P.OUTCOME] == PublishOutcome.REFUSED


class LoopbackGrid:
    """A grid whose nodes are merchants answering through the real handler, at once."""

    def __init__(self, merchants: dict[int, MerchantConfig]) -> None:
        self.merchants = merchants
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.merchants)

    def get_nodes(self) -> list[Any]:
        return [SimpleNamespace(node_id=n, last_activated_at="t0") for n in self.merchants]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for i, message in enumerate(messages):
            node = message.metadata.dst_node_id
            content = publication_reply(message.content[P.CONFIG], self.merchants[node])
            status = content[P.STATUS]
            self.pending[f"m{i}"] = SimpleNamespace(  # type: ignore[assignment]
                content={P.STATUS: status},
                has_error=lambda: False,
                metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=f"m{i}"),
            )
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.pending.pop(i) for i in ids if i in self.pending]


def test_publish_over_a_grid_reports_each_merchant(platform, tmp_path: Path) -> None:
    _, other = generate_keypair(tmp_path / "other", name="other")
    grid = LoopbackGrid(
        {1: merchant(tmp_path, "m1", platform.public), 2: merchant(tmp_path, "m2", other)}
    )
    report = publish(grid, platform.publisher, reason="promoted")  # type: ignore[arg-type]
    assert report.serial == 1
    assert report.installed == {"m1": platform.ids[0]}
    assert set(report.refused) == {"m2"} and "does not verify" in report.refused["m2"]
    assert read_replies(1, []).installed == {}


def test_the_clientapp_routes_query_publish_to_the_handler(platform, tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from client.app import app

    shop = merchant(tmp_path, "m1", platform.public)
    toml = tmp_path / "m1.toml"
    toml.write_text(shop.to_toml())
    (message,) = publish_messages(platform.publisher.sign(reason="v1"), [1])
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"merchant-config": str(toml)},
        state=RecordDict(),
        run_config={},
    )
    reply = app(message, context)
    report = read_replies(1, [reply])
    assert report.installed == {"m1": platform.ids[0]}
