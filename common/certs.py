"""Certificates and node keys for a TLS federation, made with ``cryptography`` only.

Three kinds of material, each in its own directory:

* a certificate authority (``ca.crt``, ``ca.key``) that the platform keeps offline;
* the SuperLink's server certificate (``server.crt``, ``server.key``, plus a copy of ``ca.crt``)
  whose subject alternative names list every host name and IP merchants dial;
* one ECDSA P-384 key pair per merchant SuperNode (``NAME.node.key`` in OpenSSH private-key
  format, ``NAME.node.pub`` in OpenSSH public-key format): the formats ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` load.

Private keys are written with mode 0600 through a temporary file and ``os.replace``, so a crash
never leaves a half-written key, and nothing is overwritten unless ``force`` is given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    DNSName,
    IPAddress,
    PolicyBuilder,
    Store,
    VerificationError,
)

from common.atomic import atomic_write_bytes
from common.errors import DeploymentError
from common.keys import read_pem_file

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NODE_KEY_SUFFIX = ".node.key"
NODE_PUB_SUFFIX = ".node.pub"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
CURVE = ec.SECP384R1()
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CLOCK_SKEW = dt.timedelta(minutes=5)
_LAST_DATE = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)  # X.509's latest time
_COMMON_NAME_BYTES = 64  # RFC 5280's upper bound for a common name


@dataclass(frozen=True)
class CaFiles:
    """Where a certificate authority lives."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerFiles:
    """The SuperLink's TLS material: pass these to ``--ssl-*`` flags."""

    cert: Path
    key: Path
    ca_cert: Path


@dataclass(frozen=True)
class NodeKeyFiles:
    """A SuperNode's authentication key pair and the public key's SHA-256 fingerprint."""

    private_key: Path
    public_key: Path
    fingerprint: str


def validate_name(name: str) -> str:
    """A merchant/node name safe for file names and logs; raise naming the bad value."""
    if not _NAME_RE.match(name):
        raise DeploymentError(
            f"node name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"
            " and start with a letter or digit"
        )
    return name


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` (private keys: 0600), all or nothing."""
    atomic_write_bytes(path, data, mode=mode)


def _refuse_overwrite(paths: Sequence[Path], *, force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise DeploymentError(
            f"refusing to overwrite {', '.join(existing)}: pass --force to replace (rotation)"
        )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _validity_days(days: int) -> dt.timedelta:
    if not isinstance(days, int) or days <= 0:
        raise DeploymentError(f"--days {days!r}: validity must be a positive number of days")
    latest = (_LAST_DATE - _now()).days
    if days > latest:
        raise DeploymentError(
            f"--days {days}: the certificate would be valid past {_LAST_DATE:%Y-%m-%d}, the "
            f"last date X.509 can hold; expected at most {latest} days"
        )
    return dt.timedelta(days=days)


def _common_name(value: str, what: str) -> x509.Name:
    """A subject holding ``value`` as its common name, which X.509 limits to 1-64 bytes."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise DeploymentError(f"{what} {value!r} is not valid text") from None
    if not value.strip() or size > _COMMON_NAME_BYTES:
        raise DeploymentError(
            f"{what} {value!r} is {size} bytes; expected 1-{_COMMON_NAME_BYTES} bytes, "
            "not only spaces"
        )
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def _read_pem(path: Path, what: str) -> bytes:
    return read_pem_file(path, what, error=DeploymentError)


def init_ca(
    out: Path, *, common_name: str = "fedshop CA", valid_days: int = 3650, force: bool = False
) -> CaFiles:
    """Create a self-signed CA (P-384) in ``out``; it signs SuperLink certificates only."""
    files = CaFiles(cert=out / CA_CERT, key=out / CA_KEY)
    lifetime = _validity_days(valid_days)
    name = _common_name(common_name, "--common-name")
    _refuse_overwrite([files.cert, files.key], force=force)
    key = ec.generate_private_key(CURVE)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _CLOCK_SKEW)
        .not_valid_after(_now() + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(files.key, _private_pem(key), mode=PRIVATE_MODE)
    write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
    return files


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM certificate, naming the file on failure."""
    data = _read_pem(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise DeploymentError(f"{path} is not a PEM certificate: {exc}") from None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = load_certificate(ca_dir / CA_CERT)
    data = _read_pem(ca_dir / CA_KEY, "CA key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DeploymentError(f"{ca_dir / CA_KEY} is not an unencrypted PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeploymentError(f"{ca_dir / CA_KEY} is not an EC key")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise DeploymentError(f"{ca_dir / CA_KEY} does not belong to {ca_dir / CA_CERT}")
    return cert, key


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        raise DeploymentError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def issue_server_cert(
    *,
    ca_dir: Path,
    hosts: Sequence[str],
    out: Path,
    valid_days: int = 397,
    force: bool = False,
) -> ServerFiles:
    """Issue the SuperLink's certificate under the CA in ``ca_dir`` for ``hosts`` (SANs)."""
    if not hosts:
        raise DeploymentError("a server certificate needs at least one --host (DNS name or IP)")
    names = [_general_name(h) for h in hosts]
    subject = _common_name(hosts[0], "the first --host (the certificate's common name)")
    lifetime = _validity_days(valid_days)
    ca_cert, ca_key = _load_ca(ca_dir)
    files = ServerFiles(cert=out / SERVER_CERT, key=out / SERVER_KEY, ca_cert=out / CA_CERT)
    _refuse_overwrite([files.cert, files.key], force=force)
    key = ec.generate_private_key(CURVE)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _CLOCK_SKEW)
        .not_valid_after(min(_now() + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(files.key, _private_pem(key), mode=PRIVATE_MODE)
    write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    write_atomic(files.ca_cert, ca_pem, mode=PUBLIC_MODE)
    return files


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for, as strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [*dns, *ips]


def verify_server_cert(*, cert_path: Path, ca_cert_path: Path, host: str) -> x509.Certificate:
    """Check that ``cert_path`` chains to ``ca_cert_path``, is valid now and names ``host``.

    This is the check a SuperNode's TLS stack makes; running it before starting the SuperLink
    turns a silent handshake failure on every merchant into one clear error on the platform.
    """
    leaf = load_certificate(cert_path)
    ca = load_certificate(ca_cert_path)
    try:
        subject: DNSName | IPAddress = IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = DNSName(host)
    verifier = PolicyBuilder().store(Store([ca])).time(_now()).build_server_verifier(subject)
    try:
        verifier.verify(leaf, [])
    except VerificationError as exc:
        sans = ", ".join(subject_alt_names(leaf)) or "none"
        raise DeploymentError(
            f"{cert_path} does not verify against CA {ca_cert_path} for host {host!r} "
            f"(SANs: {sans}): {exc}"
        ) from None
    return leaf


def verify_key_matches_cert(*, key_path: Path, cert_path: Path) -> None:
    """Check that the server key belongs to the server certificate (a common rotation slip)."""
    cert = load_certificate(cert_path)
    data = _read_pem(key_path, "key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DeploymentError(f"{key_path} is not an unencrypted PEM key: {exc}") from None
    probe = b"fedshop key check"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeploymentError(f"{key_path} is not an EC key")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise DeploymentError(f"{cert_path} does not hold an EC public key")
    try:
        public.verify(key.sign(probe, ec.ECDSA(hashes.SHA384())), probe, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise DeploymentError(f"{key_path} does not belong to {cert_path}") from None


def public_key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<hex>`` over the OpenSSH public-key blob: the id to log and compare."""
    blob = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return "SHA256:" + hashlib.sha256(blob.split()[1]).hexdigest()


def generate_node_key(*, out: Path, name: str, force: bool = False) -> NodeKeyFiles:
    """Create ``NAME.node.key`` (OpenSSH, 0600) and ``NAME.node.pub`` for a merchant's SuperNode.

    The ``.node`` infix keeps these apart from the merchant's ledger signing keys.
    """
    validate_name(name)
    private_path, public_path = out / f"{name}{NODE_KEY_SUFFIX}", out / f"{name}{NODE_PUB_SUFFIX}"
    _refuse_overwrite([private_path, public_path], force=force)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(private_path, private, mode=PRIVATE_MODE)
    write_atomic(public_path, public + f" {name}\n".encode(), mode=PUBLIC_MODE)
    return NodeKeyFiles(private_path, public_path, public_key_fingerprint(key.public_key()))


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a node's OpenSSH public key, insisting on ECDSA P-384 as Flower's examples use."""
    data = _read_pem(path, "node public key")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DeploymentError(f"{path} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise DeploymentError(f"{path} is not an ECDSA P-384 key (ecdsa-sha2-nistp384)")
    return key


def node_name_of(public_key_path: Path) -> str:
    """The node name a public-key file stands for (``m1.node.pub`` -> ``m1``)."""
    name = public_key_path.name
    for suffix in (NODE_PUB_SUFFIX, ".pub"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return public_key_path.stem


def load_allowlist(directory: Path) -> dict[str, Path]:
    """Every ``*.node.pub`` in ``directory`` by node name; all must be P-384 keys (checked
    first). Other files (merchants' ledger keys ``NAME.pub``) may share the directory."""
    if not directory.is_dir():
        raise DeploymentError(f"--nodes-allowlist {directory} is not a directory")
    keys = {node_name_of(p): p for p in sorted(directory.glob(f"*{NODE_PUB_SUFFIX}"))}
    if not keys:
        raise DeploymentError(f"--nodes-allowlist {directory} holds no *{NODE_PUB_SUFFIX} keys")
    for path in keys.values():
        load_node_public_key(path)
    return keys


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a node's OpenSSH private key and refuse one that others can read."""
    data = _read_pem(path, "node private key")
    mode = path.stat().st_mode & 0o777
    if data.lstrip().startswith((b"ecdsa-sha2-", b"ssh-")):
        private = path.name.removesuffix(".pub") + ".key" if path.name.endswith(".pub") else None
        raise DeploymentError(
            f"{path} is a public key; --node-key takes the private key"
            + (f" ({private}, mode 600)" if private else "")
        )
    if mode & 0o077:
        raise DeploymentError(
            f"node private key {path} has mode {mode:o}; run `chmod 600 {path}` first"
        )
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DeploymentError(f"{path} is not an OpenSSH private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
        raise DeploymentError(f"{path} is not an ECDSA P-384 key")
    return key
