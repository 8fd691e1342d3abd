"""A merchant's events as the next-basket model needs them, built at the merchant only.

The merchant's event files are indexed as one basket log in which each file is a *period*:
the training events, then what comes after them (validation, test, or the newest inbox
cohort). Periods stand where weeks stand in common/nextbasket/baskets.py: training cases are
the baskets of the first period, held-out cases the first basket of each household in a later
period, with every earlier event of the household as its history, and the catalogue is what
the merchant sold in the first period. Logs are cached by the content hash of their files
(a simulation worker serves many merchants in turn; a SuperNode's runner keeps its merchant's).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.events import read_events
from common.nextbasket.baskets import BasketLog, CaseSet, basket_cases, basket_log, heldout_cases
from common.nextbasket.features import HistoryFeatures, history_features, merchant_popularity
from common.nextbasket.records import item_ids
from common.nextbasket.spec import ScorerSpec
from common.split import WEEK

TRAINING_PERIOD = 1


@dataclass(frozen=True)
class PeriodLog:
    """A merchant's basket log whose ``week`` column is the period of each event."""

    log: BasketLog
    items: np.ndarray  # [products, 3] hashed (product, category, department)
    periods: int

    def training_cases(self) -> CaseSet:
        """Every basket of the training period (the DP training targets)."""
        first = (TRAINING_PERIOD, TRAINING_PERIOD)
        return basket_cases(self.log, weeks=first, catalogue_weeks=first)

    def heldout(self, period: int) -> tuple[CaseSet, HistoryFeatures, np.ndarray]:
        """The first basket of each household in ``period``: cases, their features and the
        merchant's popularity of each catalogue product before the period."""
        cases = heldout_cases(
            self.log,
            period=(period, period),
            catalogue_weeks=(TRAINING_PERIOD, TRAINING_PERIOD),
        )
        popularity = merchant_popularity(self.log, before_week=period)
        return cases, history_features(self.log, cases), popularity


def period_log(frames: Sequence[pd.DataFrame], spec: ScorerSpec) -> PeriodLog:
    """One log of ``frames`` (training first), period ``i + 1`` for ``frames[i]``."""
    parts = [f.assign(**{WEEK: i + 1}) for i, f in enumerate(frames) if len(f)]
    log = basket_log(pd.concat(parts, ignore_index=True), source="merchant events")
    return PeriodLog(log=log, items=item_ids(log, spec), periods=len(frames))


_CACHE: OrderedDict[tuple[tuple[str, ...], ScorerSpec], PeriodLog] = OrderedDict()
_CACHE_SIZE = 16


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def period_log_of_files(paths: Sequence[Path], spec: ScorerSpec) -> PeriodLog:
    """:func:`period_log` of event files, cached by their content hashes."""
    key = (tuple(_digest(p) for p in paths), spec)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    made = period_log([read_events(p) for p in paths], spec)
    while len(_CACHE) >= _CACHE_SIZE:
        _CACHE.popitem(last=False)
    _CACHE[key] = made
    return made


@dataclass(frozen=True)
class TrainingData:
    """What one DP round trains on: the training cases, their features, the hashed ids."""

    cases: CaseSet
    features: HistoryFeatures
    items: np.ndarray

    @classmethod
    def of(cls, periods: PeriodLog) -> TrainingData:
        cases = periods.training_cases()
        return cls(cases, history_features(periods.log, cases), periods.items)


_TRAINING: OrderedDict[tuple[str, ScorerSpec], TrainingData] = OrderedDict()


def training_data(path: Path, spec: ScorerSpec) -> TrainingData:
    """The training data of an event file (its features computed once per content)."""
    key = (_digest(path), spec)
    if key not in _TRAINING:
        while len(_TRAINING) >= _CACHE_SIZE:
            _TRAINING.popitem(last=False)
        _TRAINING[key] = TrainingData.of(period_log_of_files([path], spec))
    _TRAINING.move_to_end(key)
    return _TRAINING[key]
