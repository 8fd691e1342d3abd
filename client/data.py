"""A merchant's training data, loaded and encoded once per process.

Simulation actors and long-lived SuperNode processes keep the encoding between rounds; a
changed file (size or mtime) is re-read.
"""

from __future__ import annotations

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


_CACHE: dict[tuple[str, int, int, ModelSpec], PreparedData] = {}


def prepared_data(path: Path, spec: ModelSpec) -> PreparedData:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, spec)
    if key not in _CACHE:
        events = read_events(path)
        encoded = encode_events(events, spec)
        _CACHE.clear()
        _CACHE[key] = PreparedData(
            encoded=encoded,
            catalog=build_catalog(events, spec),
            customers=int(events["customer_id"].nunique()),
        )
    return _CACHE[key]
