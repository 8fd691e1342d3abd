"""Publishing to merchants on one machine: the Flower message path without the transport.

The platform side (server/publish.py) signs a publication and builds the exact record a
``query.publish`` message carries; the merchant side (client/publish.py) installs it with the
same function its ClientApp action calls. Simulations, the serving benchmark and tests use this
to put a registry version into merchants' mirrors; a deployment sends the same record through
the SuperLink (:func:`server.publish.publish`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flwr.app import ConfigRecord

from client.merchant import MerchantConfig
from client.publish import publication_reply
from common import protocol as P
from common.keys import load_signing_key
from common.nextbasket.spec import ScorerSpec, describe
from server.online import platform_keys
from server.publish import Publisher, PublishReport, SignedPublication, record_answer
from server.registry import ModelRegistry


def platform_registry(root: Path, *, keys: Path) -> tuple[ModelRegistry, Path]:
    """A registry under ``root`` signed by ``keys/platform.key`` (created if missing); returns
    it and the public key merchants pin."""
    private, public = platform_keys(keys)
    key = load_signing_key(private)
    return ModelRegistry(root, signing_key=key, verify_key=key.public_key()), public


def publisher_for(registry: ModelRegistry, keys: Path, spec: ScorerSpec) -> Publisher:
    return Publisher(registry, load_signing_key(keys / "platform.key"), model=describe(spec))


def deliver(signed: SignedPublication, merchants: Iterable[MerchantConfig]) -> PublishReport:
    """Hand ``signed`` to each merchant's publish handler and collect the answers."""
    report = PublishReport(signed.publication.serial)
    for merchant in merchants:
        status = publication_reply(signed.config(), merchant)[P.STATUS]
        assert isinstance(status, ConfigRecord)
        record_answer(report, status)
    return report
