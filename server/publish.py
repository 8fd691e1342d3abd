"""Send the serving model (and an A/B candidate) to merchants after a promotion or rollback.

A publication (common/publication.py) is signed with the registry's platform key and numbered by
a serial kept in the registry's index (table ``publications``), so every publication ever sent is
on record and merchants can refuse one that is not newer than what they hold. Each merchant gets
the publication plus the signed manifest and the weights bytes of every version it names, in one
``query.publish`` message; its ClientApp (client/publish.py) verifies everything with the platform
key pinned in its merchant.toml, stores the versions in its mirror and answers installed or
refused. Nothing about customers travels in either direction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import protocol as P
from common import sqlite_store
from common.errors import ConfigError
from common.keys import check_pair
from common.publication import (
    PUBLICATION_KEY,
    PUBLISH_MESSAGE_TYPE,
    SERVING_KEY,
    ModelDescriptor,
    Publication,
    PublishOutcome,
    manifest_key,
    sign_publication,
    weights_key,
)
from server.acceptance import short_reason
from server.exchange import exchange
from server.registry import ModelRegistry

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS publications (
    serial INTEGER PRIMARY KEY AUTOINCREMENT,
    serving INTEGER NOT NULL REFERENCES versions(id),
    candidate INTEGER REFERENCES versions(id),
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class SignedPublication:
    """A publication and the record content every merchant receives for it."""

    publication: Publication
    envelope: bytes
    files: dict[int, tuple[bytes, bytes]]  # version id -> (manifest envelope, weights)

    def config(self, simulation_dir: Path | None = None) -> ConfigRecord:
        values: dict[str, bytes | str] = {PUBLICATION_KEY: self.envelope}
        for version_id, (manifest, weights) in self.files.items():
            values[manifest_key(version_id)] = manifest
            values[weights_key(version_id)] = weights
        if simulation_dir is not None:
            values[P.SIMULATION_DIR] = str(simulation_dir)
        return ConfigRecord(values)  # type: ignore[arg-type]


@dataclass
class PublishReport:
    """Per merchant: installed (with the version it serves now), refused or failed (why)."""

    serial: int
    installed: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class Publisher:
    """Signs publications of the registry's serving version and numbers them."""

    def __init__(
        self, registry: ModelRegistry, signing_key: Ed25519PrivateKey, *, model: ModelDescriptor
    ) -> None:
        check_pair(signing_key, registry.verify_key)
        self.registry = registry
        self.model = model
        self._signing_key = signing_key
        with sqlite_store.connect(registry.index_path) as conn:
            conn.executescript(_SCHEMA)

    def sign(
        self, *, reason: str, candidate: int | None = None, now: datetime | None = None
    ) -> SignedPublication:
        """A new publication of the version that serves now (and ``candidate``), on record."""
        if not reason.strip():
            raise ConfigError("a publication needs a non-empty reason")
        serving = self.registry.promoted()
        if serving is None:
            raise ConfigError(f"no version serves in {self.registry.root}: promote one first")
        if candidate is not None and candidate == serving.id:
            raise ConfigError(f"candidate {candidate} is the version that serves already")
        ids = (serving.id,) if candidate is None else (serving.id, candidate)
        files = {version_id: self.registry.signed_files(version_id) for version_id in ids}
        at = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
        with sqlite_store.transaction(self.registry.index_path, foreign_keys=True) as conn:
            cursor = conn.execute(
                "INSERT INTO publications (serving, candidate, reason, at) VALUES (?,?,?,?)",
                (serving.id, candidate, reason, at),
            )
            serial = int(cursor.lastrowid or 0)
        publication = Publication(
            serial=serial,
            serving=serving.id,
            candidate=candidate,
            model=self.model,
            reason=reason,
            issued_at=at,
        )
        envelope = sign_publication(publication, self._signing_key)
        return SignedPublication(publication, envelope, files)

    def history(self) -> list[tuple[int, int, int | None, str, str]]:
        """Every publication sent: (serial, serving, candidate, reason, at), oldest first."""
        with sqlite_store.connect(self.registry.index_path) as conn:
            rows = conn.execute(
                "SELECT serial, serving, candidate, reason, at FROM publications ORDER BY serial"
            ).fetchall()
        return [(int(s), int(v), c, str(r), str(a)) for s, v, c, r, a in rows]


def publish_messages(
    signed: SignedPublication, nodes: list[int], *, simulation_dir: Path | None = None
) -> list[Message]:
    return [
        Message(
            content=RecordDict({P.CONFIG: signed.config(simulation_dir)}),
            message_type=PUBLISH_MESSAGE_TYPE,
            dst_node_id=node,
        )
        for node in nodes
    ]


def read_replies(serial: int, replies: list[Message]) -> PublishReport:
    """Sort the merchants' answers; an error reply is named by its node id."""
    report = PublishReport(serial)
    for reply in replies:
        if reply.has_error():
            node = f"node-{reply.metadata.src_node_id}"
            report.failed[node] = short_reason(str(reply.error.reason))
            continue
        status = reply.content[P.STATUS]
        assert isinstance(status, ConfigRecord)
        record_answer(report, status)
    return report


def record_answer(report: PublishReport, status: ConfigRecord) -> None:
    """One merchant's status record: installed (and the version it serves) or refused."""
    merchant = str(status[P.MERCHANT_ID])
    if str(status[P.OUTCOME]) == PublishOutcome.INSTALLED:
        report.installed[merchant] = int(str(status[SERVING_KEY]))
    else:
        report.refused[merchant] = str(status[P.REASON])


def publish(
    grid: Grid,
    publisher: Publisher,
    *,
    reason: str,
    candidate: int | None = None,
    timeout_s: float = 300.0,
    simulation_dir: Path | None = None,
) -> PublishReport:
    """Sign a publication of the serving version and send it to every connected merchant."""
    signed = publisher.sign(reason=reason, candidate=candidate)
    nodes = sorted(grid.get_node_ids())
    sent = exchange(
        grid,
        publish_messages(signed, nodes, simulation_dir=simulation_dir),
        timeout_s=timeout_s,
    )
    report = read_replies(signed.publication.serial, sent.replies)
    for node in [*sent.restarted, *sent.unanswered]:
        report.failed[f"node-{node}"] = "no answer to the publication"
    log.info(
        "publication %d (serving v%d%s): installed at %d merchant(s), refused by %d, failed %d",
        signed.publication.serial,
        signed.publication.serving,
        "" if candidate is None else f", candidate v{candidate}",
        len(report.installed),
        len(report.refused),
        len(report.failed),
    )
    return report
