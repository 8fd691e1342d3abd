"""A merchant's training data, loaded and encoded once per process.

Simulation actors and long-lived SuperNode processes keep the encoding between rounds; a
changed file (size or mtime) is re-read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from common.events import read_events
from common.features import Catalog, EncodedEvents, build_catalog, encode_events
from common.model import ModelSpec


@dataclass(frozen=True)
class PreparedData:
    encoded: EncodedEvents
    catalog: Catalog
    customers: int


_CACHE: OrderedDict[tuple[str, int, int, ModelSpec], PreparedData] = OrderedDict()
_CACHE_SIZE = 32  # a simulation actor serves many merchants in turn


def prepared_data(path: Path, spec: ModelSpec) -> PreparedData:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, spec)
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        events = read_events(path)
        encoded = encode_events(events, spec)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.popitem(last=False)
        _CACHE[key] = PreparedData(
            encoded=encoded,
            catalog=build_catalog(events, spec),
            customers=int(events["customer_id"].nunique()),
        )
    return _CACHE[key]
