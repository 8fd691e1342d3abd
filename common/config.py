"""The run configuration: one TOML file, parsed once into frozen dataclasses.

Sections: ``[federation]``, ``[training]``, ``[privacy]``, ``[model]``, ``[evaluation]``,
``[data]``, ``[simulation]`` (where a simulation runs) plus a top-level ``seed``. ``[privacy]``
is what the platform *requests*; each merchant's own configuration caps it (a merchant may
spend less, never more).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

from common.accounting import MAX_EPSILON_CAP, MIN_NOISE_MULTIPLIER, AccountantKind, PrivacyUnit
from common.canonical import canonical_json
from common.configparse import as_plain_dict, from_mapping, load_toml
from common.errors import ConfigError
from common.events import parse_mapping
from common.nextbasket.spec import RecordSpec, ScorerSpec
from common.split import (
    DEFAULT_SLICE_DAYS,
    SplitRule,
    TimeSplit,
    WeekSplit,
    check_week_ranges,
    parse_moment,
    split_by_dates,
    split_by_span,
    split_by_weeks,
)


class StrategyKind(Enum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"


class UpdateDtype(Enum):
    """How a merchant's reply carries its trained weights: float32 (the model's own precision)
    or float16 (half the bytes; values beyond float16's range saturate at +-65504, which the
    platform refuses). The platform aggregates either exactly and keeps the model in float32."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.value)


class OptimizerKind(Enum):
    """Local optimiser. Adam rescales DP noise on rows no record touched to the step size;
    SGD keeps it proportional to sigma x C / batch."""

    ADAM = "adam"
    SGD = "sgd"


class DataSource(Enum):
    COMPLETEJOURNEY = "completejourney"
    SYNTHETIC = "synthetic"
    FILES = "files"  # the user's own event files (``fedshop simulate --data PATH``)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 6
    strategy: StrategyKind = StrategyKind.FEDAVG
    min_merchants: int = 2
    round_timeout_s: float = 900.0
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    max_update_norm: float = 1e4
    update_dtype: UpdateDtype = UpdateDtype.FLOAT32  # of the weights in a merchant's reply

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds must be >= 1, got {self.rounds}")
        if self.min_merchants < 1:
            raise ConfigError(f"federation.min_merchants must be >= 1, got {self.min_merchants}")
        if not self.round_timeout_s > 0:
            raise ConfigError("federation.round_timeout_s must be > 0")
        if not self.server_learning_rate > 0:
            raise ConfigError(
                f"federation.server_learning_rate must be > 0, got {self.server_learning_rate}"
            )
        if not self.proximal_mu >= 0:
            raise ConfigError(f"federation.proximal_mu must be >= 0, got {self.proximal_mu}")
        if not self.max_update_norm > 0:
            raise ConfigError(f"federation.max_update_norm must be > 0, got {self.max_update_norm}")


@dataclass(frozen=True)
class TrainingConfig:
    """Local training of each round. A record is one target basket (event unit) or one
    household (customer unit, far fewer records: hence its own batch size)."""

    batch_size: int = 256
    customer_batch_size: int = 32
    local_epochs: int = 2
    learning_rate: float | None = None  # None: 1e-2 for Adam, 0.5 for SGD
    optimizer: OptimizerKind = OptimizerKind.ADAM
    momentum: float = 0.9

    @property
    def step_size(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 0.5 if self.optimizer is OptimizerKind.SGD else 1e-2

    def batch_for(self, unit: PrivacyUnit) -> int:
        return self.customer_batch_size if unit is PrivacyUnit.CUSTOMER else self.batch_size

    def __post_init__(self) -> None:
        for name in ("batch_size", "customer_batch_size", "local_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"training.momentum must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Requested DP settings. ``enabled = false`` is for non-private baselines only."""

    enabled: bool = True
    unit: PrivacyUnit = PrivacyUnit.EVENT
    epsilon_cap: float = 3.0
    delta: float = 1e-5
    clipping_norm: float = 1.0
    noise_multiplier: float | None = None  # None: calibrate to epsilon_cap over the planned rounds
    accountant: AccountantKind = AccountantKind.PLD  # calibration and caps; RDP is recorded too

    def __post_init__(self) -> None:
        if not 0 < self.epsilon_cap <= MAX_EPSILON_CAP:
            raise ConfigError(
                f"privacy.epsilon_cap must be in (0, {MAX_EPSILON_CAP:g}], got {self.epsilon_cap} "
                "(a non-private baseline is privacy.enabled = false)"
            )
        if not (0 < self.delta < 1):
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if not (self.clipping_norm > 0 and math.isfinite(self.clipping_norm)):
            raise ConfigError(f"privacy.clipping_norm must be > 0, got {self.clipping_norm}")
        if self.noise_multiplier is not None and not self.noise_multiplier >= MIN_NOISE_MULTIPLIER:
            raise ConfigError(
                f"privacy.noise_multiplier must be >= {MIN_NOISE_MULTIPLIER:g}, got "
                f"{self.noise_multiplier} (below it epsilon is unbounded for every accountant "
                "fedshop uses; a non-private baseline is privacy.enabled = false)"
            )


@dataclass(frozen=True)
class EvaluationConfig:
    """Full-ranking next-basket evaluation (docs/evaluation.md); the sampled figure (the bought
    product among ``sampled_negatives`` random catalogue products) is a secondary column."""

    sampled_negatives: int = 99
    every_round: bool = True  # validation after each round (false: only the final test)

    def __post_init__(self) -> None:
        if self.sampled_negatives < 1:
            raise ConfigError(
                f"evaluation.sampled_negatives must be >= 1, got {self.sampled_negatives}"
            )


@dataclass(frozen=True)
class DataConfig:
    """Where a simulation's events come from, which merchants take part, and the time split.

    The split (docs/data.md): explicit ``train_until``/``valid_until`` dates win; otherwise
    Complete Journey and synthetic data use their week ranges, and own files the last
    ``test_fraction`` of the whole data set's time span as test period and the
    ``valid_fraction`` before it as validation.
    """

    source: DataSource = DataSource.COMPLETEJOURNEY
    path: str = ""  # files: one file with a merchant_id column, or a folder of one file per shop
    mapping: tuple[str, ...] = ()  # files: column renames SRC=FIELD (FIELD '-' drops a column)
    top_n: int = 10
    min_rows: int = 10_000
    exclude: tuple[str, ...] = ()  # merchants left out after the top_n are chosen
    train_weeks: tuple[int, int] = (1, 40)
    valid_weeks: tuple[int, int] = (41, 44)
    test_weeks: tuple[int, int] = (45, 53)
    train_until: str = ""  # ISO date/time (naive = UTC): training events are before it
    valid_until: str = ""  # validation events are before it, test events from it on
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    slice_days: int = DEFAULT_SLICE_DAYS  # online streaming: length of one held-out slice
    synthetic_events_per_merchant: int = 6000

    @property
    def week_split(self) -> WeekSplit:
        return WeekSplit(train=self.train_weeks, valid=self.valid_weeks, test=self.test_weeks)

    @property
    def split_rule(self) -> SplitRule:
        if self.train_until:
            return SplitRule.DATES
        return SplitRule.SPAN if self.source is DataSource.FILES else SplitRule.WEEKS

    def time_split(
        self,
        *,
        first_event: pd.Timestamp,
        last_event: pd.Timestamp,
        week_origin: pd.Timestamp | None,
    ) -> TimeSplit:
        """The split of a data set whose events run from ``first_event`` to ``last_event``;
        ``week_origin`` is the start of week 1 for sources that count weeks."""
        rule = self.split_rule
        if rule is SplitRule.DATES:
            return split_by_dates(
                train_until=parse_moment(self.train_until, field="data.train_until"),
                valid_until=parse_moment(self.valid_until, field="data.valid_until"),
                first_event=first_event,
                slice_days=self.slice_days,
            )
        if rule is SplitRule.SPAN:
            return split_by_span(
                first_event=first_event,
                last_event=last_event,
                valid_fraction=self.valid_fraction,
                test_fraction=self.test_fraction,
                slice_days=self.slice_days,
            )
        if week_origin is None:
            raise ConfigError(f"data.source = {self.source.value} has no week calendar")
        return split_by_weeks(self.week_split, origin=week_origin, slice_days=self.slice_days)

    def __post_init__(self) -> None:
        check_week_ranges(
            {"train": self.train_weeks, "valid": self.valid_weeks, "test": self.test_weeks},
            field=lambda part: f"data.{part}_weeks",
        )
        if self.top_n < 1:
            raise ConfigError(f"data.top_n must be >= 1, got {self.top_n}")
        if self.min_rows < 1:
            raise ConfigError(f"data.min_rows must be >= 1, got {self.min_rows}")
        if self.slice_days < 1:
            raise ConfigError(f"data.slice_days must be >= 1, got {self.slice_days}")
        if any(not m.strip() for m in self.exclude) or len(set(self.exclude)) != len(self.exclude):
            raise ConfigError(
                f"data.exclude must name merchants, each once, got {list(self.exclude)}"
            )
        self._check_files()
        self._check_split()

    def _check_files(self) -> None:
        if self.source is DataSource.FILES:
            if not self.path.strip():
                raise ConfigError("data.source = files needs data.path (fedshop simulate --data)")
            try:
                parse_mapping(self.mapping)
            except ConfigError as exc:
                raise ConfigError(f"data.mapping: {exc}") from None
        elif self.path or self.mapping:
            raise ConfigError(
                f"data.path and data.mapping are for data.source = files, not {self.source.value}"
            )

    def _check_split(self) -> None:
        if bool(self.train_until) != bool(self.valid_until):
            raise ConfigError("data.train_until and data.valid_until go together: set both")
        if self.train_until:
            train = parse_moment(self.train_until, field="data.train_until")
            valid = parse_moment(self.valid_until, field="data.valid_until")
            if not train < valid:
                raise ConfigError(
                    f"data.train_until ({self.train_until}) must be before "
                    f"data.valid_until ({self.valid_until})"
                )
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"data.{name} must be in (0, 1), got {value}")
        if not self.valid_fraction + self.test_fraction < 1:
            raise ConfigError(
                "data.valid_fraction + data.test_fraction must be < 1 (something must be "
                f"left to train on), got {self.valid_fraction} + {self.test_fraction}"
            )


def check_ray_address(value: str, *, field: str = "simulation.ray_address") -> str:
    """``HOST:PORT`` of a running Ray cluster's head node (IPv6 hosts in brackets)."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or "/" in value or any(c.isspace() for c in value):
        raise ConfigError(f"{field}: {value!r} is not HOST:PORT (e.g. 10.0.0.5:6379)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{field}: port {port!r} of {value!r} is not in 1..65535")
    return value


@dataclass(frozen=True)
class SimulationConfig:
    """Where Flower's simulation engine runs. It does not change what is trained, so it is
    left out of ``config_sha256``: a run may move onto a Ray cluster when it is resumed."""

    ray_address: str = ""  # HOST:PORT of a running Ray cluster (empty: start Ray locally)

    def __post_init__(self) -> None:
        if self.ray_address:
            check_ray_address(self.ray_address)


@dataclass(frozen=True)
class RunConfig:
    seed: int = 20261123
    federation: FederationConfig = field(default_factory=FederationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    model: ScorerSpec = field(default_factory=ScorerSpec)
    records: RecordSpec = field(default_factory=RecordSpec)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return from_mapping(cls, data)

    @classmethod
    def from_toml(cls, path: Path) -> RunConfig:
        data = load_toml(path)  # its errors name the file already
        try:
            return from_mapping(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = as_plain_dict(self)
        if plain["privacy"]["noise_multiplier"] is None:
            del plain["privacy"]["noise_multiplier"]
        if plain["simulation"] == as_plain_dict(SimulationConfig()):
            del plain["simulation"]  # the defaults: configurations read as they always did
        if self.federation.update_dtype is UpdateDtype.FLOAT32:
            # the default: configurations (and their hashes) read as before the option existed
            del plain["federation"]["update_dtype"]
        return plain

    def sha256(self) -> str:
        """What a signed release cites as ``config_sha256``: everything but ``[simulation]``."""
        plain = self.to_dict()
        plain.pop("simulation", None)
        return hashlib.sha256(canonical_json(plain)).hexdigest()


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML text that :func:`load_toml` reads back to ``data``. TOML has no null, so None
    values are left out: every field that may be None defaults to None."""
    return tomli_w.dumps(_without_none(data))


def _without_none(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _without_none(value) if isinstance(value, Mapping) else value
        for key, value in data.items()
        if value is not None
    }
