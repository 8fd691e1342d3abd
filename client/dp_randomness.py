"""The merchant's secret for DP randomness, and the generators derived from it.

DP-SGD's guarantee rests on the noise and the Poisson batches being unknown to whoever sees
the released weights. If they were derived from anything the platform knows (its run seed,
public names), the platform could replay the batches and subtract the noise, and the released
weights would be a deterministic function of the merchant's data. So every random draw of a
merchant's training round comes from a secret that only the merchant holds: 32 bytes from the
operating system's CSPRNG, created once in the merchant's state directory with mode 0600,
never sent and never logged. Streams are derived from it with HKDF-SHA256 over a path of names
(run, round, stream), so the merchant can replay its own rounds exactly (resume, re-send) and
no one else can.

The torch generators that Opacus draws noise from take a 64-bit seed; recovering one means
searching 2^64 seeds, each checked by replaying a whole training round.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.atomic import atomic_create
from common.errors import ConfigError, IntegrityError

SECRET_FILE = "dp-secret"
SECRET_BYTES = 32
NOISE_SOURCE = "merchant-secret"  # recorded in every release (see common/ledger)
_DOMAIN = b"fedshop/dp-randomness/v1"

StreamKey = str | int


@dataclass(frozen=True)
class MerchantSecret:
    """A merchant's secret key for DP randomness; ``repr`` never shows it."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ConfigError(f"a DP secret needs at least 128 bits, got {8 * len(self.key)}")

    def derive(self, *path: StreamKey, length: int = 32) -> bytes:
        """``length`` bytes for the stream ``path``: HKDF-SHA256(secret, info = path)."""
        info = _DOMAIN + json.dumps([_check_key(p) for p in path]).encode("utf-8")
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(self.key)

    def numpy_stream(self, *path: StreamKey) -> np.random.Generator:
        """A NumPy generator seeded with 256 derived bits."""
        words = np.frombuffer(self.derive(*path), dtype="<u4").tolist()
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))

    def torch_stream(self, *path: StreamKey, device: str | torch.device = "cpu") -> torch.Generator:
        """A torch generator on ``device`` (DP noise is drawn where the model lives)."""
        seed = int.from_bytes(self.derive(*path, length=8), "little") & ((1 << 63) - 1)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator


def _check_key(part: StreamKey) -> StreamKey:
    if isinstance(part, bool) or not isinstance(part, str | int):
        raise ConfigError(f"stream path parts must be str or int, got {part!r}")
    return part


def secret_path(state_dir: Path) -> Path:
    return Path(state_dir) / SECRET_FILE


def ensure_merchant_secret(state_dir: Path) -> Path:
    """Create the merchant's secret in ``state_dir`` unless it exists; return its path.

    Created complete or not at all, with mode 0600 and never over an existing one, so two
    processes starting at once cannot both write one and a crash cannot leave a short secret.
    """
    path = secret_path(state_dir)
    with contextlib.suppress(FileExistsError):
        atomic_create(path, os.urandom(SECRET_BYTES), mode=0o600)
    return path


def load_merchant_secret(state_dir: Path) -> MerchantSecret:
    """Read the secret; refuses one that others can read or that has the wrong size."""
    path = secret_path(state_dir)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: the merchant's DP secret is missing (it is created with the merchant's "
            "state; restore it from the merchant's backup)"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IntegrityError(
            f"{path}: the DP secret is readable by others (mode {stat.filemode(mode)}); "
            "chmod 600 it and consider it compromised"
        )
    key = path.read_bytes()
    if len(key) != SECRET_BYTES:
        raise IntegrityError(f"{path}: expected {SECRET_BYTES} bytes, found {len(key)}")
    return MerchantSecret(key)
