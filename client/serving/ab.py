"""Which arm of an A/B test a customer is in: a keyed hash of the customer id, stable for good.

The key is 32 random bytes created once in the merchant's serving directory (mode 0600) and never
sent anywhere, so nobody outside the merchant can predict or steer a customer's arm. The hash also
covers the experiment (the candidate version), so each new candidate draws a fresh, independent
split of customers while a customer's arm within one experiment never changes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from enum import Enum
from pathlib import Path

from common.errors import ConfigError, IntegrityError

KEY_NAME = "ab-assignment.key"
KEY_BYTES = 32


class Arm(Enum):
    CONTROL = "control"  # the serving version
    CANDIDATE = "candidate"  # the published candidate


def ensure_assignment_key(directory: Path) -> bytes:
    """The merchant's assignment key, created on first use (never overwritten)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / KEY_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise IntegrityError(
                f"A/B assignment key {path} holds {len(key)} bytes, not {KEY_BYTES}; restore it "
                "(a new key would move customers between arms)"
            ) from None
        return key
    key = os.urandom(KEY_BYTES)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    directory_fd = os.open(directory, os.O_RDONLY)  # the new name survives a power loss too
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return key


def experiment_name(candidate: int) -> str:
    return f"candidate-v{candidate}"


class ArmAssigner:
    """Assigns ``share`` of customers to the candidate, by keyed hash."""

    def __init__(self, key: bytes, *, share: float) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"an A/B assignment key has {KEY_BYTES} bytes, got {len(key)}")
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"A/B share must be in [0, 1], got {share!r}")
        self._key = key
        self.share = share

    def position(self, customer_id: str, experiment: str) -> float:
        """A uniform number in [0, 1) fixed by the key, the experiment and the customer."""
        message = f"{experiment}\x1f{customer_id}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def arm(self, customer_id: str, experiment: str) -> Arm:
        if self.position(customer_id, experiment) < self.share:
            return Arm.CANDIDATE
        return Arm.CONTROL
