"""A model version's signed manifest: what a version is, checked with the platform's public key.

The platform's registry writes a manifest for every version (the weights' SHA-256 and every field
of the version, signed with the platform's Ed25519 key); a merchant's mirror of the registry
verifies the same bytes with the platform key it pinned. Both sides go through this module, so the
signed bytes and the checks cannot drift apart.

On disk and on the wire a manifest travels as an *envelope*: ``{"manifest": {...}, "signature":
hex}``. The signature covers :func:`canonical_json` of the manifest, never the envelope's layout.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.canonical import canonical_json
from common.errors import IntegrityError
from common.keys import key_fingerprint

MANIFEST_FORMAT = "fedshop-model-manifest/1"
ArraySpecs = dict[str, tuple[str, tuple[int, ...]]]


def sign_envelope(payload: Mapping[str, Any], key: Ed25519PrivateKey, *, field: str) -> bytes:
    """``{field: payload, "signature": hex}`` as indented ASCII JSON (readable on disk)."""
    signature = key.sign(canonical_json(payload))
    envelope = {field: dict(payload), "signature": signature.hex()}
    return json.dumps(envelope, indent=2, allow_nan=False).encode("ascii")


def open_envelope(
    data: bytes, verify_key: Ed25519PublicKey, *, field: str, source: str
) -> dict[str, Any]:
    """The payload of a signed envelope, or :class:`IntegrityError` naming ``source``."""
    try:
        envelope = json.loads(data)
        payload = envelope[field]
        signature = bytes.fromhex(envelope["signature"])
        if not isinstance(payload, dict):
            raise TypeError(f"{field!r} is not a JSON object")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{source} is unreadable: {exc}") from None
    try:
        verify_key.verify(signature, canonical_json(payload))
    except (InvalidSignature, ValueError, TypeError):
        raise IntegrityError(
            f"{source} does not verify against the platform key "
            f"{key_fingerprint(verify_key)[:16]}: it was altered or signed by another key"
        ) from None
    return payload


def sign_manifest(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The envelope bytes stored as ``vNNNNNN.manifest.json`` and sent to merchants."""
    return sign_envelope(manifest, key, field="manifest")


def verify_manifest(
    data: bytes, verify_key: Ed25519PublicKey, *, source: str, version_id: int | None = None
) -> dict[str, Any]:
    """The manifest of an envelope whose signature verifies (and of ``version_id`` if given)."""
    manifest = open_envelope(data, verify_key, field="manifest", source=source)
    if manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format")
        raise IntegrityError(f"{source} has format {found!r}, not {MANIFEST_FORMAT}")
    if version_id is not None and manifest.get("version_id") != version_id:
        raise IntegrityError(
            f"{source} belongs to another version ({manifest.get('version_id')!r}, "
            f"not {version_id})"
        )
    return manifest


def array_specs(manifest: Mapping[str, Any]) -> ArraySpecs:
    """Each array's dtype and shape as the manifest states them."""
    return {
        name: (str(spec["dtype"]), tuple(int(d) for d in spec["shape"]))
        for name, spec in manifest["arrays"].items()
    }


def verify_weights(
    manifest: Mapping[str, Any], data: bytes, *, source: str
) -> dict[str, np.ndarray]:
    """The arrays of ``data`` if its SHA-256 and its arrays are the ones ``manifest`` signs."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["weights_sha256"]:
        raise IntegrityError(
            f"weights file {source} changed: SHA-256 {digest} but the signed manifest "
            f"says {manifest['weights_sha256']}"
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    shapes = {k: (str(v.dtype), tuple(v.shape)) for k, v in arrays.items()}
    if shapes != array_specs(manifest):
        raise IntegrityError(f"weights file {source} does not hold the arrays its manifest lists")
    return arrays
