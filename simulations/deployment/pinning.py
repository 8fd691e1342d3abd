"""Which app bundles a merchant agrees to answer, identified by a hash of their contents.

A Flower run carries an app bundle (FAB: a zip of the app's source). A merchant answers a run
only if the bundle's *app hash* is one it pinned: by default the hash of the fedshop release
installed at the merchant, plus any extra hashes listed in its ``merchant.toml``.

The app hash covers what is inside the bundle, not the zip bytes: the SHA-256 of every
member's name and SHA-256, in name order. Two machines building the same source with Flower's
own builder get the same app hash even if their zlib compresses differently. Reading a bundle
to hash it runs none of its code.
"""

from __future__ import annotations

import hashlib
import io
import re
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.errors import DeploymentError

HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")
APP_HASHES_KEY = "app_hashes"
# A bundle is at most 10 MB compressed (Flower's FAB_MAX_SIZE); refuse to inflate more than this.
MAX_UNPACKED_BYTES = 200 * 1024 * 1024


def bundle_app_hash(fab: bytes) -> str:
    """The app hash of a bundle as received (zip bytes); a bundle that is not a well-formed
    zip raises DeploymentError and is refused like an unpinned one."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise DeploymentError(f"the app bundle is not a zip archive: {exc}") from None
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise DeploymentError("the app bundle lists a file twice")
    if sum(info.file_size for info in infos) > MAX_UNPACKED_BYTES:
        raise DeploymentError("the app bundle unpacks to more than 200 MB")
    try:
        members = {info.filename: archive.read(info) for info in infos}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DeploymentError(f"the app bundle cannot be read: {exc}") from None
    return contents_hash(members.items())


def contents_hash(members: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 over ``name NUL sha256(content) LF`` for every member, in name order."""
    digest = hashlib.sha256()
    for name, content in sorted(members):
        digest.update(f"{name}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return digest.hexdigest()


def build_bundle(app_dir: Path) -> bytes:
    """The bundle ``flwr run APP_DIR`` would submit, built with Flower's own builder."""
    from flwr.cli.build import build_fab_from_disk

    if not (app_dir / "pyproject.toml").is_file():
        raise DeploymentError(
            f"{app_dir} has no pyproject.toml: the app hash is computed from a source "
            "checkout of the app (pass --app DIR)"
        )
    try:
        return build_fab_from_disk(app_dir)
    except ValueError as exc:
        raise DeploymentError(f"cannot bundle the app in {app_dir}: {exc}") from None


def local_app_hash(app_dir: Path) -> str:
    """The app hash of the app installed in ``app_dir`` (what a platform would submit)."""
    return bundle_app_hash(build_bundle(app_dir))


def clientapp_reference(app_dir: Path) -> str:
    """``module:attribute`` of the ClientApp in ``app_dir``'s ``[tool.flwr.app.components]``."""
    pyproject = app_dir / "pyproject.toml"
    try:
        with pyproject.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DeploymentError(f"{pyproject}: {exc}") from None
    components = data.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    reference = components.get("clientapp")
    if not isinstance(reference, str) or ":" not in reference:
        raise DeploymentError(
            f"{pyproject} names no ClientApp ([tool.flwr.app.components] clientapp)"
        )
    return reference


@dataclass(frozen=True)
class PinnedApps:
    """The app hashes a merchant answers: its installed app first, then extra ones."""

    installed: str
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for value in (self.installed, *self.extra):
            if not HASH_PATTERN.match(value):
                raise DeploymentError(f"app hash {value!r} is not 64 lowercase hex digits")

    def allows(self, app_hash: str) -> bool:
        return app_hash == self.installed or app_hash in self.extra

    def describe(self) -> str:
        extra = f" and {len(self.extra)} listed in merchant.toml" if self.extra else ""
        return f"{self.installed[:16]}… (installed){extra}"


def extra_app_hashes(merchant_toml: Path) -> tuple[str, ...]:
    """``[merchant] app_hashes`` of a merchant's configuration (empty when absent)."""
    try:
        with merchant_toml.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise DeploymentError(f"merchant config {merchant_toml} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeploymentError(f"merchant config {merchant_toml}: {exc}") from None
    table = data.get("merchant")
    if not isinstance(table, dict):
        raise DeploymentError(f"merchant config {merchant_toml} has no [merchant] table")
    values = table.get(APP_HASHES_KEY, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DeploymentError(
            f"{merchant_toml}: merchant.{APP_HASHES_KEY} must be a list of app hashes"
        )
    for value in values:
        if not HASH_PATTERN.match(value):
            raise DeploymentError(
                f"{merchant_toml}: merchant.{APP_HASHES_KEY} entry {value!r} is not an app "
                "hash (64 lowercase hex digits, as `fedshop client --print-app-hash` prints)"
            )
    return tuple(values)
