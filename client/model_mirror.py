"""The merchant's copy of the platform's registry: the versions it may serve, each verified.

Layout under ``STATE_DIR/models``::

    versions/vNNNNNN.manifest.json   the platform's signed manifest envelope, byte for byte
    versions/vNNNNNN.npz             the weights the manifest's SHA-256 names
    publication.json                 the newest accepted publication (serving + A/B candidate)

Everything is checked with the platform key the merchant pinned in merchant.toml
(``platform_key``), never with a key that arrives in a message. :meth:`ModelMirror.install`
verifies the whole publication first (signature, serial newer than the one held, every named
version's manifest and weights) and only then writes: version files first, the publication file
last, each via a temporary file and a rename. A serving process that watches
``publication.json`` therefore sees the old publication or the new one, never a half-installed
version; a version that fails verification is never written and the old publication stays.
Reads verify again, so a file edited on disk is refused when it is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.atomic import atomic_write_bytes
from common.errors import IntegrityError
from common.model_manifest import verify_manifest, verify_weights
from common.publication import Publication, verify_publication

PUBLICATION_NAME = "publication.json"
VersionFiles = Mapping[int, tuple[bytes, bytes]]  # version id -> (manifest envelope, weights)


@dataclass(frozen=True)
class MirroredVersion:
    """One verified version: its signed manifest and its arrays."""

    version_id: int
    manifest: Mapping[str, Any]
    arrays: dict[str, np.ndarray]


class ModelMirror:
    """Verified model versions and the publication that says which of them serve."""

    def __init__(self, root: Path, *, verify_key: Ed25519PublicKey) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.publication_path = self.root / PUBLICATION_NAME
        self._verify_key = verify_key

    def _paths(self, version_id: int) -> tuple[Path, Path]:
        stem = self.versions_dir / f"v{version_id:06d}"
        return stem.with_suffix(".manifest.json"), stem.with_suffix(".npz")

    # -- reading -------------------------------------------------------------------
    def publication(self) -> Publication | None:
        """The publication in force, verified; ``None`` before the first one arrived."""
        try:
            data = self.publication_path.read_bytes()
        except FileNotFoundError:
            return None
        return verify_publication(data, self._verify_key, source=str(self.publication_path))

    def token(self) -> tuple[int, int, int] | None:
        """A cheap fingerprint of the publication file: it changes whenever one is installed."""
        try:
            info = self.publication_path.stat()
        except FileNotFoundError:
            return None
        return info.st_mtime_ns, info.st_size, info.st_ino

    def load(self, version_id: int) -> MirroredVersion:
        """Version ``version_id`` from disk, its signature and weights hash checked again."""
        manifest_path, weights_path = self._paths(version_id)
        try:
            envelope, weights = manifest_path.read_bytes(), weights_path.read_bytes()
        except FileNotFoundError as exc:
            raise IntegrityError(
                f"model version {version_id} is not in the mirror {self.root}: {exc.filename} "
                "is missing"
            ) from None
        manifest, arrays = self._verify(
            version_id,
            envelope,
            weights,
            source=str(manifest_path),
            weights_source=str(weights_path),
        )
        return MirroredVersion(version_id, manifest, arrays)

    def _verify(
        self,
        version_id: int,
        envelope: bytes,
        weights: bytes,
        *,
        source: str,
        weights_source: str,
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        manifest = verify_manifest(envelope, self._verify_key, source=source, version_id=version_id)
        arrays = verify_weights(manifest, weights, source=weights_source)
        return manifest, arrays

    # -- installing ----------------------------------------------------------------
    def install(self, publication: bytes, files: VersionFiles) -> Publication:
        """Verify ``publication`` and the versions it names, then store them (all or nothing).

        ``files`` may leave out versions the mirror already holds. Re-installing the publication
        in force is a no-op; an older serial, a bad signature or a version that does not verify
        raises :class:`IntegrityError` and leaves the mirror as it was.
        """
        incoming = verify_publication(
            publication, self._verify_key, source="the publication from the platform"
        )
        current = self.publication()
        if current is not None and incoming.serial <= current.serial:
            if (
                incoming.serial == current.serial
                and publication == self.publication_path.read_bytes()
            ):
                return current
            raise IntegrityError(
                f"publication serial {incoming.serial} is not newer than serial "
                f"{current.serial} this merchant holds (a replay or an out-of-order delivery)"
            )
        to_write: dict[int, tuple[bytes, bytes]] = {}
        for version_id in incoming.versions():
            if version_id in files:
                envelope, weights = files[version_id]
                self._verify(
                    version_id,
                    envelope,
                    weights,
                    source=f"manifest of version {version_id} from the platform",
                    weights_source=f"of version {version_id} from the platform",
                )
                to_write[version_id] = (envelope, weights)
            else:
                self.load(version_id)  # must already be here, intact
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        for version_id, (envelope, weights) in to_write.items():
            manifest_path, weights_path = self._paths(version_id)
            atomic_write_bytes(weights_path, weights)
            atomic_write_bytes(manifest_path, envelope)
        atomic_write_bytes(self.publication_path, publication)
        return incoming
