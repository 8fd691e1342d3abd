"""Ed25519 signing keys, one pair per merchant, for the privacy ledger.

A merchant signs every privacy release with its private key before weights leave it; the
server and auditors verify with the public key alone. Keys are plain PEM files so that an
auditor can check them with any tool (``openssl pkey -pubin -in NAME.pub -text``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.atomic import atomic_create
from common.errors import ConfigError, FedshopError, IntegrityError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


def validate_name(name: str) -> str:
    """Merchant ids double as file names: letters, digits, ``.``, ``_``, ``-`` (max 128)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"merchant name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    try:
        atomic_create(path, data, mode=mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key") from None


def generate_keypair(directory: Path, *, name: str) -> tuple[Path, Path]:
    """Create ``NAME.key`` (PKCS8 PEM, mode 0600) and ``NAME.pub`` in ``directory``."""
    validate_name(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / f"{name}{PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, mode=0o600)
    try:
        _write_new(public_path, public_pem, mode=0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def read_pem_file(path: Path, what: str, *, error: type[FedshopError] = ConfigError) -> bytes:
    """The bytes of ``path``; a missing file, a directory or an unreadable one is named as
    ``what`` in an ``error`` (keys and certificates report through different classes)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory; expected a PEM file") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror}") from None


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load a merchant's private key; errors name the file and what is wrong with it."""
    data = read_pem_file(path, "signing key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"signing key file {path} is not an unencrypted PEM key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key file {path} holds a {type(key).__name__}, not Ed25519")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """Load a merchant's public key; errors name the file and what is wrong with it."""
    data = read_pem_file(path, "public key file")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"public key file {path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key file {path} holds a {type(key).__name__}, not Ed25519")
    return key


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 hex of the raw 32-byte public key: what merchants read out to the operator."""
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()


NODE_PUBLIC_SUFFIX = ".node.pub"  # a merchant's SuperNode key, not a ledger key


def load_key_directory(directory: Path) -> dict[str, Ed25519PublicKey]:
    """All ``NAME.pub`` files of ``directory``, keyed by merchant id (the file stem).

    SuperNode keys (``NAME.node.pub``) may share the directory and are skipped: the operator
    collects both of a merchant's public keys in one place."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"key directory {directory} does not exist")
    keys: dict[str, Ed25519PublicKey] = {}
    for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
        if path.name.endswith(NODE_PUBLIC_SUFFIX):
            continue
        keys[path.name[: -len(PUBLIC_SUFFIX)]] = load_verify_key(path)
    return keys


def check_pair(signing_key: Ed25519PrivateKey, verify_key: Ed25519PublicKey) -> None:
    """Raise IntegrityError unless the two keys belong together."""
    if raw_public_bytes(signing_key.public_key()) != raw_public_bytes(verify_key):
        raise IntegrityError("the signing key does not match the registered public key")
