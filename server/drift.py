"""Drift detection on each merchant's loss, to decide when to run an early round.

Input: for every merchant, the loss of the serving model on that merchant's newest cohort, one
value per observation, oldest first. Method: a one-sided Page-Hinkley test with a fixed reference
(equivalently Page's CUSUM) on robustly standardised losses:

1. The first ``warmup`` observations after a (re)start set the reference level (median) and scale
   (1.4826 x median absolute deviation, floored so a flat series cannot divide by zero).
2. Each later loss becomes ``z = (loss - median) / scale``, clipped to ``[-clip, clip]`` so that a
   single outlier cannot raise an alarm on its own.
3. ``g = max(0, g + z - delta)``; an alarm is raised when ``g > threshold``. Only increases of
   the loss count: a model getting better on new data is not a reason to retrain early.
4. After an alarm the detector restarts, learning the new level from the next ``warmup`` values.

With the defaults (warmup 8, delta 0.5, threshold 8, clip 4) a shift of 3 scale units is found
within 4 observations, a shift of 1 unit in about 16; on stationary Gaussian noise false alarms
are rare (see ``tests/test_drift.py`` for the measured rates). Everything here is a pure function
of its input: the same histories always give the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.errors import ConfigError, DataValidationError

MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class DriftConfig:
    """Parameters of the detector, in units of the robust scale of each merchant's loss."""

    warmup: int = 8
    delta: float = 0.5
    threshold: float = 8.0
    clip: float = 4.0
    min_relative_scale: float = 0.01
    min_merchants: int = 1

    def __post_init__(self) -> None:
        if self.warmup < 3:
            raise ConfigError(f"drift.warmup must be >= 3 observations, got {self.warmup!r}")
        checks = {
            "delta": self.delta >= 0,
            "threshold": self.threshold > 0,
            "clip": self.clip > 0,
            "min_relative_scale": self.min_relative_scale > 0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and ok):
                raise ConfigError(f"drift.{name} is out of range: {value!r}")
        if self.min_merchants < 1:
            raise ConfigError(f"drift.min_merchants must be >= 1, got {self.min_merchants!r}")


@dataclass(frozen=True)
class MerchantDrift:
    """Detector output for one merchant's series."""

    alarms: tuple[int, ...]
    statistic: float
    reference: float | None
    scale: float | None


@dataclass(frozen=True)
class DriftDecision:
    """Whether to start an early round, which merchants drifted, and a sentence saying why."""

    trigger: bool
    drifted: tuple[str, ...]
    reason: str
    details: Mapping[str, MerchantDrift] = field(default_factory=dict)


def _reference(window: np.ndarray, config: DriftConfig) -> tuple[float, float]:
    median = float(np.median(window))
    mad = float(np.median(np.abs(window - median)))
    floor = config.min_relative_scale * max(abs(median), 1e-12)
    return median, max(MAD_TO_SD * mad, floor)


def page_hinkley(losses: Sequence[float], config: DriftConfig | None = None) -> MerchantDrift:
    """Run the detector over one series; ``alarms`` are the indices where it fired."""
    cfg = config or DriftConfig()
    values = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise DataValidationError(f"loss at index {int(bad[0])} is {values[bad[0]]!r}; not finite")
    alarms: list[int] = []
    start, g = 0, 0.0
    reference: tuple[float, float] | None = None
    for index, value in enumerate(values):
        if reference is None:
            if index - start + 1 == cfg.warmup:
                reference = _reference(values[start : index + 1], cfg)
            continue
        median, scale = reference
        z = min(max((value - median) / scale, -cfg.clip), cfg.clip)
        g = max(0.0, g + z - cfg.delta)
        if g > cfg.threshold:
            alarms.append(index)
            start, g, reference = index + 1, 0.0, None
    ref_level, ref_scale = reference if reference is not None else (None, None)
    return MerchantDrift(tuple(alarms), g, ref_level, ref_scale)


def decide(
    histories: Mapping[str, Sequence[float]],
    *,
    seen: Mapping[str, int] | None = None,
    config: DriftConfig | None = None,
) -> DriftDecision:
    """Trigger an early round when at least ``min_merchants`` merchants drifted since last time.

    ``seen[m]`` is how many of merchant ``m``'s observations were already considered when the
    last round started; alarms before that index do not count again.
    """
    cfg = config or DriftConfig()
    already = seen or {}
    details: dict[str, MerchantDrift] = {}
    drifted: list[str] = []
    for merchant in sorted(histories):
        try:
            result = page_hinkley(histories[merchant], cfg)
        except DataValidationError as exc:
            raise DataValidationError(f"merchant {merchant!r}: {exc}") from None
        details[merchant] = result
        if any(a >= already.get(merchant, 0) for a in result.alarms):
            drifted.append(merchant)
    trigger = len(drifted) >= cfg.min_merchants
    if trigger:
        reason = f"loss drift at {len(drifted)} merchant(s) ({', '.join(drifted)}): early round"
    elif drifted:
        reason = f"drift at {', '.join(drifted)} only; need {cfg.min_merchants} merchants"
    else:
        reason = "no drift detected"
    return DriftDecision(trigger, tuple(drifted), reason, details)
