"""Which model versions a merchant should serve: a publication signed with the platform key.

The platform's registry says which version serves (promotion, rollback) and may name a candidate
for an A/B test. A publication carries that decision to merchants: the serving version, the
optional candidate, the model kind and shape a scorer needs, and a serial number that only grows.
The merchant verifies it with the platform key it pinned and refuses any publication whose serial
is not newer than the one it already holds, so a replayed old publication cannot silently roll a
merchant back; a rollback is a new publication (higher serial) naming an older version.

The message that carries a publication (``query.publish``) holds the publication envelope plus,
for each version it names, the signed manifest envelope and the weights bytes exactly as the
registry stored them, so the merchant checks the same SHA-256 the platform signed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import IntegrityError
from common.keys import key_fingerprint
from common.model_manifest import open_envelope, sign_envelope

PUBLICATION_FORMAT = "fedshop-serving-publication/1"

# The Flower message: ClientApp action ``@app.query(PUBLISH_ACTION)``.
PUBLISH_ACTION = "publish"
PUBLISH_MESSAGE_TYPE = f"query.{PUBLISH_ACTION}"
PUBLICATION_KEY = "publication"  # ConfigRecord bytes: the signed publication envelope
MANIFEST_PREFIX = "manifest-"  # + version id: its signed manifest envelope (bytes)
WEIGHTS_PREFIX = "weights-"  # + version id: its weights, the registry's .npz bytes
SERVING_KEY = "serving"  # reply status: the version the merchant serves after installing
SERIAL_KEY = "serial"  # reply status: the publication serial the merchant now holds


def manifest_key(version_id: int) -> str:
    return f"{MANIFEST_PREFIX}{version_id}"


def weights_key(version_id: int) -> str:
    return f"{WEIGHTS_PREFIX}{version_id}"


def version_files(values: Mapping[str, object]) -> dict[int, tuple[bytes, bytes]]:
    """Version id -> (manifest envelope, weights) from a publication message's config."""
    files: dict[int, tuple[bytes, bytes]] = {}
    for key, envelope in values.items():
        if not key.startswith(MANIFEST_PREFIX):
            continue
        number = key.removeprefix(MANIFEST_PREFIX)
        weights = values.get(weights_key(int(number))) if number.isdigit() else None
        if not isinstance(envelope, bytes) or not isinstance(weights, bytes):
            raise IntegrityError(
                f"publication message: {key!r} lacks its manifest or weights bytes"
            )
        files[int(number)] = (envelope, weights)
    return files


class PublishOutcome:
    """What a merchant answers to a publication (the reply's ``outcome`` status value)."""

    INSTALLED = "installed"
    REFUSED = "refused"


@dataclass(frozen=True)
class ModelDescriptor:
    """The model kind (which scorer reads the arrays) and its shape parameters."""

    kind: str
    spec: Mapping[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": dict(self.spec)}


@dataclass(frozen=True)
class Publication:
    """One signed decision: serve ``serving``; A/B test ``candidate`` if set."""

    serial: int
    serving: int
    candidate: int | None
    model: ModelDescriptor
    reason: str
    issued_at: str
    key_fingerprint: str = ""

    def versions(self) -> tuple[int, ...]:
        return (self.serving,) if self.candidate is None else (self.serving, self.candidate)

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": PUBLICATION_FORMAT,
            "serial": self.serial,
            "serving": self.serving,
            "candidate": self.candidate,
            "model": self.model.to_payload(),
            "reason": self.reason,
            "issued_at": self.issued_at,
            "key_fingerprint": self.key_fingerprint,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], *, source: str) -> Publication:
        """Check every field's type before building; errors name ``source`` and the field."""
        if payload.get("format") != PUBLICATION_FORMAT:
            raise IntegrityError(
                f"{source}: format {payload.get('format')!r} is not {PUBLICATION_FORMAT}"
            )
        serial = _positive_int(payload, "serial", source)
        serving = _positive_int(payload, "serving", source)
        candidate = None
        if payload.get("candidate") is not None:
            candidate = _positive_int(payload, "candidate", source)
            if candidate == serving:
                raise IntegrityError(f"{source}: candidate {candidate} is the serving version")
        model = payload.get("model")
        if not (
            isinstance(model, Mapping)
            and isinstance(model.get("kind"), str)
            and isinstance(model.get("spec"), Mapping)
        ):
            raise IntegrityError(f"{source}: 'model' must be {{kind: str, spec: object}}")
        for name in ("reason", "issued_at", "key_fingerprint"):
            if not isinstance(payload.get(name), str):
                raise IntegrityError(f"{source}: {name!r} must be a string")
        return cls(
            serial=serial,
            serving=serving,
            candidate=candidate,
            model=ModelDescriptor(str(model["kind"]), dict(model["spec"])),
            reason=str(payload["reason"]),
            issued_at=str(payload["issued_at"]),
            key_fingerprint=str(payload["key_fingerprint"]),
        )


def _positive_int(payload: Mapping[str, Any], name: str, source: str) -> int:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IntegrityError(f"{source}: {name!r} must be an integer >= 1, got {value!r}")
    return value


def sign_publication(publication: Publication, key: Ed25519PrivateKey) -> bytes:
    """The envelope bytes sent to merchants (the key's fingerprint is filled in)."""
    stamped = Publication(
        **{**publication.__dict__, "key_fingerprint": key_fingerprint(key.public_key())}
    )
    return sign_envelope(stamped.to_payload(), key, field="publication")


def verify_publication(data: bytes, verify_key: Ed25519PublicKey, *, source: str) -> Publication:
    """The publication of an envelope whose signature verifies, or :class:`IntegrityError`."""
    payload = open_envelope(data, verify_key, field="publication", source=source)
    return Publication.from_payload(payload, source=source)
