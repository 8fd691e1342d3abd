"""A merchant's training data, loaded and encoded once per process.

Simulation actors and long-lived SuperNode processes keep the encoding between rounds. The
cache is keyed by the content hash of the file, so a changed file is re-read whatever its
timestamps say.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.events import CUSTOMER_ID, read_events
from common.features import Catalog, EncodedEvents, build_catalog, encode_events
from common.model import ModelSpec


@dataclass(frozen=True)
class PreparedData:
    encoded: EncodedEvents
    catalog: Catalog
    customers: int


_CACHE: OrderedDict[tuple[str, ModelSpec], PreparedData] = OrderedDict()
_CACHE_SIZE = 32  # a simulation actor serves many merchants in turn


def prepare_frame(events: pd.DataFrame, spec: ModelSpec) -> PreparedData:
    """Encode canonical events for training."""
    return PreparedData(
        encoded=encode_events(events, spec),
        catalog=build_catalog(events, spec),
        customers=int(events[CUSTOMER_ID].nunique()),
    )


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepared_data(path: Path, spec: ModelSpec) -> PreparedData:
    key = (_digest(path), spec)
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.popitem(last=False)
        _CACHE[key] = prepare_frame(read_events(path), spec)
    return _CACHE[key]
