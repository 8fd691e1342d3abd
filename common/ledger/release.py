"""What a merchant states about one privacy release, and the rules every release obeys."""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from common.accounting import AccountantKind, MechanismStep, PrivacyUnit
from common.canonical import canonical_json_text
from common.errors import ConfigError, FedshopError, IntegrityError
from common.keys import NAME_PATTERN

MECHANISM = "poisson_subsampled_gaussian"
NOISE_SOURCE = "merchant-secret"
"""Where the release's noise and Poisson batches came from: streams derived from a secret only
the merchant holds (client/dp_randomness.py). Nothing else is accepted: noise that another party
can regenerate protects nothing against that party."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[!-~]{1,200}")
_UTC_ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")

_FLOAT_FIELDS = (
    "noise_multiplier",
    "sample_rate",
    "clipping_norm",
    "delta",
    "epsilon_after",
    "epsilon_rdp",
    "epsilon_cap",
)
_INT_FIELDS = ("round", "steps", "dataset_size")

Fail = Callable[[str], FedshopError]  # builds the error that names a bad field


def utc_now_iso() -> str:
    """Current time as ISO-8601 UTC with a ``Z`` suffix (microseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_hex64(name: str, value: object, fail: Fail = ConfigError) -> None:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise fail(f"{name} must be 64 lowercase hex digits, got {value!r}")


def _check_token(name: str, value: object, fail: Fail = ConfigError) -> None:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise fail(f"{name} must be 1-200 printable ASCII characters, got {value!r}")


def _check_int(name: str, value: object, minimum: int, fail: Fail = ConfigError) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_created(value: object, fail: Fail) -> None:
    if not isinstance(value, str) or not _UTC_ISO.fullmatch(value):
        raise fail(f"created_utc must be ISO-8601 UTC ending in Z, got {value!r}")
    try:
        datetime.fromisoformat(value[:-1])
    except ValueError:
        raise fail(f"created_utc is not a real date and time: {value!r}") from None


def _check_number(name: str, value: object, fail: Fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise fail(f"{name} must be finite, got {value!r}")
    return number


def _check_ranges(v: Mapping[str, float], fail: Fail) -> None:
    if v["noise_multiplier"] < 0:
        raise fail(f"noise_multiplier must be >= 0, got {v['noise_multiplier']!r}")
    if not 0 < v["sample_rate"] <= 1:
        raise fail(f"sample_rate must be in (0, 1], got {v['sample_rate']!r}")
    if v["clipping_norm"] <= 0:
        raise fail(f"clipping_norm must be > 0, got {v['clipping_norm']!r}")
    if not 0 < v["delta"] < 1:
        raise fail(f"delta must be in (0, 1), got {v['delta']!r}")
    if v["epsilon_after"] < 0:
        raise fail(f"epsilon_after must be >= 0, got {v['epsilon_after']!r}")
    if v["epsilon_cap"] <= 0:
        raise fail(f"epsilon_cap must be > 0, got {v['epsilon_cap']!r}")
    if v["epsilon_rdp"] < 0:
        raise fail(f"epsilon_rdp must be >= 0, got {v['epsilon_rdp']!r}")


def _check_versions(versions: object, fail: Fail) -> None:
    if not isinstance(versions, Mapping):
        raise fail(f"library_versions must be a mapping, got {versions!r}")
    for key, value in versions.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise fail(f"library_versions: {key!r}: {value!r} is not str -> str")


def _check_release(v: Mapping[str, Any], fail: Fail) -> dict[str, float]:
    """Every rule of a :class:`PrivacyRelease` over its field values (enums as members), in
    one place for the dataclass and for bulk audits; returns the float fields as floats.
    ``fail`` builds the error that names the first bad field: ConfigError for a release being
    made, IntegrityError (with where it came from) for one received or stored."""
    merchant_id = v["merchant_id"]
    if not isinstance(merchant_id, str) or not NAME_PATTERN.fullmatch(merchant_id):
        raise fail(f"merchant_id {merchant_id!r} is not a valid merchant name")
    _check_token("run_id", v["run_id"], fail)
    _check_token("cohort", v["cohort"], fail)
    for name in ("model_in_sha256", "model_out_sha256", "config_sha256"):
        _check_hex64(name, v[name], fail)
    for name in _INT_FIELDS:
        _check_int(name, v[name], 1, fail)
    if not isinstance(v["privacy_unit"], PrivacyUnit):
        raise fail(f"privacy_unit must be a PrivacyUnit, got {v['privacy_unit']!r}")
    if not isinstance(v["accountant"], AccountantKind):
        raise fail(f"accountant must be an AccountantKind, got {v['accountant']!r}")
    if v["mechanism"] != MECHANISM:
        raise fail(f"mechanism must be {MECHANISM!r}, got {v['mechanism']!r}")
    if v["noise_source"] != NOISE_SOURCE:
        raise fail(f"noise_source must be {NOISE_SOURCE!r}, got {v['noise_source']!r}")
    floats = {name: _check_number(name, v[name], fail) for name in _FLOAT_FIELDS}
    _check_ranges(floats, fail)
    _check_versions(v["library_versions"], fail)
    _check_created(v["created_utc"], fail)
    return floats


def _release_values(data: object, fail: Fail) -> dict[str, Any]:
    """A release's JSON object as field values: exactly the known keys, enums by value."""
    if not isinstance(data, Mapping):
        raise fail(f"release must be a JSON object, got {type(data).__name__}")
    if data.keys() != _RELEASE_FIELDS:
        missing, unknown = _RELEASE_FIELDS - set(data), set(data) - _RELEASE_FIELDS
        raise fail(f"release fields: missing {sorted(missing)}, unknown {sorted(unknown)}")
    values = dict(data)
    try:
        values["privacy_unit"] = PrivacyUnit(data["privacy_unit"])
    except ValueError:
        raise fail(f"privacy_unit {data['privacy_unit']!r} is not known") from None
    try:
        values["accountant"] = AccountantKind(data["accountant"])
    except ValueError:
        raise fail(f"accountant {data['accountant']!r} is not known") from None
    return values


def _normalised(values: Mapping[str, Any], fail: Fail) -> dict[str, Any]:
    """Checked field values as stored on a release: floats as floats, versions frozen."""
    checked = {**values, **_check_release(values, fail)}
    versions = values["library_versions"]
    checked["library_versions"] = types.MappingProxyType(dict(sorted(versions.items())))
    return checked


def received(where: str) -> Fail:
    """The failure for a release read from ``where`` (wire or storage): IntegrityError."""
    return lambda message: IntegrityError(f"{where}: {message}")


@dataclass(frozen=True)
class PrivacyRelease:
    """What a merchant states about one release of model weights (immutable, signed)."""

    merchant_id: str
    run_id: str
    round: int
    model_in_sha256: str
    model_out_sha256: str
    cohort: str
    privacy_unit: PrivacyUnit
    mechanism: str
    noise_source: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clipping_norm: float
    delta: float
    dataset_size: int
    accountant: AccountantKind  # the one that calibrated sigma and checked the cap
    epsilon_after: float  # by ``accountant``: the figure caps and budgets use
    epsilon_rdp: float  # by RDP, the looser second bound, always recorded
    epsilon_cap: float
    config_sha256: str
    library_versions: Mapping[str, str] = field(default_factory=dict)
    created_utc: str = field(default_factory=lambda: utc_now_iso())

    def __post_init__(self) -> None:
        for name, value in _normalised(self.__dict__, ConfigError).items():
            object.__setattr__(self, name, value)

    @property
    def mechanism_step(self) -> MechanismStep:
        """The (sigma, q, steps) the accountant composes."""
        return MechanismStep(self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["privacy_unit"] = self.privacy_unit.value
        data["accountant"] = self.accountant.value
        data["library_versions"] = dict(self.library_versions)
        return data

    @cached_property
    def canonical_json(self) -> str:
        """What is stored and hashed (as text: it is embedded in the entry's canonical JSON)."""
        return canonical_json_text(self.to_dict())

    @classmethod
    def from_dict(cls, data: object, *, where: str = "release") -> PrivacyRelease:
        """Strict inverse of :meth:`to_dict` for a release received or read from ``where``:
        exactly the known keys, enums by value; IntegrityError names the bad field.

        Built without ``__init__``: the values were just checked with the same rules, and
        checking twice would double the cost of opening a ledger."""
        fail = received(where)
        release = object.__new__(cls)
        release.__dict__.update(_normalised(_release_values(data, fail), fail))
        return release


_RELEASE_FIELDS = frozenset(PrivacyRelease.__dataclass_fields__)
