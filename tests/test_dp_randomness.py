"""The merchant's DP secret: created once, private, and the only source of its streams."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from client.dp_randomness import (
    SECRET_BYTES,
    MerchantSecret,
    ensure_merchant_secret,
    load_merchant_secret,
    secret_path,
)
from common.errors import ConfigError, IntegrityError


def test_created_once_with_owner_only_permissions(tmp_path):
    path = ensure_merchant_secret(tmp_path / "state")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert len(first) == SECRET_BYTES
    assert ensure_merchant_secret(tmp_path / "state") == path
    assert path.read_bytes() == first  # never overwritten


def test_two_merchants_get_different_secrets(tmp_path):
    a = load_merchant_secret(ensure_merchant_secret(tmp_path / "a").parent)
    b = load_merchant_secret(ensure_merchant_secret(tmp_path / "b").parent)
    assert a.key != b.key


def test_streams_replay_for_the_holder_and_differ_by_path():
    secret = MerchantSecret(bytes(range(32)))
    same = MerchantSecret(bytes(range(32)))
    path = ("run-1", "round", 3, "noise")
    assert secret.numpy_stream(*path).random() == same.numpy_stream(*path).random()
    draw = torch.randn(4, generator=secret.torch_stream(*path))
    assert torch.equal(draw, torch.randn(4, generator=same.torch_stream(*path)))
    other = torch.randn(4, generator=secret.torch_stream("run-1", "round", 4, "noise"))
    assert not torch.equal(draw, other)
    # "3" and 3 are different paths (no string/int confusion)
    assert secret.derive("round", 3) != secret.derive("round", "3")


def test_another_key_gives_other_streams():
    a = MerchantSecret(b"\x01" * 32).numpy_stream("x").integers(0, 2**62, size=4)
    b = MerchantSecret(b"\x02" * 32).numpy_stream("x").integers(0, 2**62, size=4)
    assert not np.array_equal(a, b)


def test_secret_never_shown():
    secret = MerchantSecret(b"\xaa" * 32)
    assert "aa" not in repr(secret).lower() and "\\xaa" not in repr(secret)


def test_short_keys_refused():
    with pytest.raises(ConfigError, match="128 bits"):
        MerchantSecret(b"short")


def test_readable_by_others_is_refused(tmp_path):
    path = ensure_merchant_secret(tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(IntegrityError, match="readable by others"):
        load_merchant_secret(tmp_path)


def test_wrong_size_and_missing(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        load_merchant_secret(tmp_path)
    path = secret_path(tmp_path)
    path.write_bytes(b"x" * 5)
    os.chmod(path, 0o600)
    with pytest.raises(IntegrityError, match="expected 32 bytes"):
        load_merchant_secret(tmp_path)
