"""Certificates and node keys: chains verify, SANs and modes are right, mistakes are caught."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from common import certs
from common.errors import DeploymentError, ExitCode

CLI = Path(__file__).parent / "support" / "deploy_cli.py"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    certs.init_ca(tmp_path / "ca")
    return tmp_path / "ca"


def test_server_cert_chains_to_ca_and_lists_sans(ca: Path, tmp_path: Path) -> None:
    files = certs.issue_server_cert(
        ca_dir=ca, hosts=["link.example.com", "127.0.0.1", "::1"], out=tmp_path / "srv"
    )
    for host in ("link.example.com", "127.0.0.1", "::1"):
        leaf = certs.verify_server_cert(cert_path=files.cert, ca_cert_path=files.ca_cert, host=host)
    assert sorted(certs.subject_alt_names(leaf)) == ["127.0.0.1", "::1", "link.example.com"]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert files.ca_cert.read_bytes() == (ca / "ca.crt").read_bytes()
    certs.verify_key_matches_cert(key_path=files.key, cert_path=files.cert)


def test_private_keys_are_0600_and_certificates_0644(ca: Path, tmp_path: Path) -> None:
    files = certs.issue_server_cert(ca_dir=ca, hosts=["127.0.0.1"], out=tmp_path / "srv")
    node = certs.generate_node_key(out=tmp_path / "nodes", name="store-1")
    assert mode(ca / "ca.key") == 0o600
    assert mode(files.key) == 0o600
    assert mode(node.private_key) == 0o600
    assert mode(ca / "ca.crt") == 0o644
    assert mode(files.cert) == 0o644
    assert mode(node.public_key) == 0o644
    leftovers = [p.name for d in (ca, tmp_path / "srv", tmp_path / "nodes") for p in d.iterdir()]
    assert not [name for name in leftovers if name.endswith(".tmp")]


def test_wrong_ca_and_wrong_host_are_detected(ca: Path, tmp_path: Path) -> None:
    files = certs.issue_server_cert(ca_dir=ca, hosts=["127.0.0.1"], out=tmp_path / "srv")
    other = certs.init_ca(tmp_path / "other", common_name="impostor CA")
    with pytest.raises(DeploymentError, match="does not verify"):
        certs.verify_server_cert(cert_path=files.cert, ca_cert_path=other.cert, host="127.0.0.1")
    with pytest.raises(DeploymentError, match=r"SANs: 127\.0\.0\.1"):
        certs.verify_server_cert(cert_path=files.cert, ca_cert_path=files.ca_cert, host="10.0.0.9")


def test_certificate_signed_by_impostor_with_same_name_is_rejected(
    ca: Path, tmp_path: Path
) -> None:
    impostor = certs.init_ca(tmp_path / "impostor")  # same default subject as the real CA
    files = certs.issue_server_cert(ca_dir=impostor.cert.parent, hosts=["h"], out=tmp_path / "s")
    with pytest.raises(DeploymentError):
        certs.verify_server_cert(cert_path=files.cert, ca_cert_path=ca / "ca.crt", host="h")


def test_refuses_to_overwrite_without_force_and_rotation_keeps_the_ca(
    ca: Path, tmp_path: Path
) -> None:
    first = certs.issue_server_cert(ca_dir=ca, hosts=["127.0.0.1"], out=tmp_path / "srv")
    old = first.cert.read_bytes()
    with pytest.raises(DeploymentError, match="--force"):
        certs.issue_server_cert(ca_dir=ca, hosts=["127.0.0.1"], out=tmp_path / "srv")
    assert first.cert.read_bytes() == old
    with pytest.raises(DeploymentError, match="--force"):
        certs.init_ca(ca)
    rotated = certs.issue_server_cert(
        ca_dir=ca, hosts=["127.0.0.1", "10.1.2.3"], out=tmp_path / "srv", force=True
    )
    assert rotated.cert.read_bytes() != old
    certs.verify_server_cert(cert_path=rotated.cert, ca_cert_path=ca / "ca.crt", host="10.1.2.3")


def test_key_that_does_not_match_certificate_is_detected(ca: Path, tmp_path: Path) -> None:
    a = certs.issue_server_cert(ca_dir=ca, hosts=["a"], out=tmp_path / "a")
    b = certs.issue_server_cert(ca_dir=ca, hosts=["b"], out=tmp_path / "b")
    with pytest.raises(DeploymentError, match="does not belong"):
        certs.verify_key_matches_cert(key_path=b.key, cert_path=a.cert)


def test_node_key_is_p384_openssh_as_flower_expects(tmp_path: Path) -> None:
    files = certs.generate_node_key(out=tmp_path, name="store-367")
    assert files.private_key.name == "store-367.node.key"
    private = serialization.load_ssh_private_key(files.private_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert files.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    public = certs.load_node_public_key(files.public_key)
    assert certs.public_key_fingerprint(public) == files.fingerprint
    assert certs.public_key_fingerprint(private.public_key()) == files.fingerprint
    # The exact loader `flwr supernode register` uses accepts it.
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(files.public_key)


def test_node_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    files = certs.generate_node_key(out=tmp_path, name="m1")
    certs.load_node_private_key(files.private_key)
    files.private_key.chmod(0o644)
    with pytest.raises(DeploymentError, match="chmod 600"):
        certs.load_node_private_key(files.private_key)


def test_allowlist_rejects_keys_that_are_not_p384(tmp_path: Path) -> None:
    certs.generate_node_key(out=tmp_path, name="good")
    assert list(certs.load_allowlist(tmp_path)) == ["good"]
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    blob = ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "bad.node.pub").write_bytes(blob)
    with pytest.raises(DeploymentError, match=r"bad\.node\.pub is not an ECDSA P-384"):
        certs.load_allowlist(tmp_path)


def test_allowlist_may_share_a_directory_with_ledger_keys(tmp_path: Path) -> None:
    """The operator collects each merchant's NAME.node.pub and NAME.pub in one place."""
    from common.keys import generate_keypair, load_key_directory

    certs.generate_node_key(out=tmp_path, name="m1")
    generate_keypair(tmp_path, name="m1")
    assert list(certs.load_allowlist(tmp_path)) == ["m1"]
    assert list(load_key_directory(tmp_path)) == ["m1"]


def test_a_public_key_given_as_node_key_is_named_as_such(tmp_path: Path) -> None:
    files = certs.generate_node_key(out=tmp_path, name="m1")
    with pytest.raises(DeploymentError, match=r"is a public key.*m1\.node\.key"):
        certs.load_node_private_key(files.public_key)


@pytest.mark.parametrize("name", ["", "../evil", "a b", "-dash", "x" * 65])
def test_bad_node_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(DeploymentError, match="node name"):
        certs.generate_node_key(out=tmp_path, name=name)
    assert not list(tmp_path.iterdir())


def test_bad_hosts_and_validity_are_refused(ca: Path, tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="neither an IP"):
        certs.issue_server_cert(ca_dir=ca, hosts=["bad host"], out=tmp_path / "s")
    with pytest.raises(DeploymentError, match="at least one --host"):
        certs.issue_server_cert(ca_dir=ca, hosts=[], out=tmp_path / "s")
    with pytest.raises(DeploymentError, match="positive number of days"):
        certs.issue_server_cert(ca_dir=ca, hosts=["h"], out=tmp_path / "s", valid_days=0)


def test_cli_creates_material_and_maps_refusal_to_exit_code(tmp_path: Path) -> None:
    def fedshop(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(CLI), "certs", *args], capture_output=True, text=True, timeout=60
        )

    assert fedshop("init", "--out", str(tmp_path / "ca")).returncode == 0
    issued = fedshop(
        "issue-server",
        "--ca-dir",
        str(tmp_path / "ca"),
        "--host",
        "127.0.0.1",
        "--host",
        "localhost",
        "--out",
        str(tmp_path / "srv"),
    )
    assert issued.returncode == 0, issued.stderr
    assert fedshop("issue-node", "--out", str(tmp_path / "n"), "--name", "m1").returncode == 0
    ok = fedshop(
        "verify",
        "--ca-cert",
        str(tmp_path / "ca/ca.crt"),
        "--cert",
        str(tmp_path / "srv/server.crt"),
        "--host",
        "localhost",
    )
    assert ok.returncode == 0 and "OK" in ok.stdout
    again = fedshop("init", "--out", str(tmp_path / "ca"))
    assert again.returncode == ExitCode.DEPLOYMENT
    assert "refusing to overwrite" in again.stderr
    wrong = fedshop(
        "verify",
        "--ca-cert",
        str(tmp_path / "ca/ca.crt"),
        "--cert",
        str(tmp_path / "srv/server.crt"),
        "--host",
        "example.org",
    )
    assert wrong.returncode == ExitCode.DEPLOYMENT
