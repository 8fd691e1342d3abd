"""Merchant signing keys: files, permissions, refusal to overwrite, clear errors."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError
from common.keys import (
    generate_keypair,
    key_fingerprint,
    load_signing_key,
    load_verify_key,
)


def test_generate_writes_pem_pair_with_private_mode_600(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "k", name="store-367")
    assert private.name == "store-367.key" and public.name == "store-367.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    signing, verify = load_signing_key(private), load_verify_key(public)
    verify.verify(signing.sign(b"release"), b"release")
    assert [p.name for p in (tmp_path / "k").iterdir() if p.name.endswith(".tmp")] == []


def test_fingerprint_is_sha256_of_raw_public_key(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path, name="m1")
    key = load_verify_key(public)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert key_fingerprint(key) == hashlib.sha256(raw).hexdigest()


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path, name="m1")
    before = private.read_bytes()
    with pytest.raises(ConfigError, match=r"m1\.key already exists"):
        generate_keypair(tmp_path, name="m1")
    assert private.read_bytes() == before


@pytest.mark.parametrize("name", ["", "../evil", "a b", "-lead", "x" * 129])
def test_bad_names_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="merchant name"):
        generate_keypair(tmp_path, name=name)


def test_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(ConfigError, match=r"nope\.key does not exist"):
        load_signing_key(missing)
    corrupt = tmp_path / "bad.pub"
    corrupt.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=r"bad\.pub"):
        load_verify_key(corrupt)
    _, public = generate_keypair(tmp_path, name="m1")
    with pytest.raises(ConfigError, match=r"m1\.pub"):
        load_signing_key(public)  # a public key where a private one is expected
    ecdsa = tmp_path / "node.key"
    ecdsa.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match=r"node\.key holds a .*not Ed25519"):
        load_signing_key(ecdsa)


def test_cli_generate_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main as run_cli

    assert run_cli(["keys", "generate", "--out", str(tmp_path), "--name", "m7"]) == 0
    fingerprint = key_fingerprint(load_verify_key(tmp_path / "m7.pub"))
    assert fingerprint in capsys.readouterr().out
    assert run_cli(["keys", "show", str(tmp_path / "m7.pub")]) == 0
    assert fingerprint in capsys.readouterr().out
    assert run_cli(["keys", "generate", "--out", str(tmp_path), "--name", "m7"]) == 3
    assert "already exists; refusing to overwrite a key" in capsys.readouterr().err
