"""Top-K for many customers at once (``fedshop recommend``), from the merchant's mirror.

The serving version of the publication in force (or a version the mirror holds, by id) with the
merchant's local part, the merchant's own events for histories and catalogue (scored as
client/serving/scorer.py describes), one row per (customer, rank) with the score
and the model version. Batch lists are not A/B tested and not logged as impressions: they go to
whatever channel the merchant sends them through, which the service cannot observe.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from client.merchant import MerchantConfig
from client.publish import open_mirror
from client.serving.history import load_events
from client.serving.scorer import NextBasketScorer, ServingEvents, load_local_state
from common.atomic import atomic_write_bytes
from common.errors import ConfigError, DataValidationError
from common.events import CUSTOMER_ID
from common.nextbasket.spec import spec_of

COLUMNS = ("customer_id", "rank", "product_id", "score", "model_version", "known_customer")
CHUNK = 256


@dataclass(frozen=True)
class BatchResult:
    rows: pd.DataFrame
    customers: int
    scoring_seconds: float  # scoring only, without loading the model and the events

    @property
    def customers_per_second(self) -> float:
        return self.customers / self.scoring_seconds if self.scoring_seconds > 0 else float("inf")


def load_scorer(merchant: MerchantConfig, version: int | None = None) -> NextBasketScorer:
    """A scorer for ``version`` (default: the serving version of the publication in force)."""
    mirror = open_mirror(merchant)
    publication = mirror.publication()
    if publication is None:
        raise ConfigError(
            f"no model has been published to merchant {merchant.id} yet ({mirror.root} is empty)"
        )
    version_id = publication.serving if version is None else version
    spec = spec_of(publication.model, version_id=version_id)
    arrays = mirror.load(version_id).arrays
    events = ServingEvents.of(load_events(merchant).events, spec)
    return NextBasketScorer(version_id, spec, arrays, load_local_state(merchant), events)


def recommend_batch(scorer: NextBasketScorer, customers: Sequence[str], k: int) -> BatchResult:
    if k < 1:
        raise ConfigError(f"-k must be >= 1, got {k}")
    frames = []
    began = time.perf_counter()
    for start in range(0, len(customers), CHUNK):
        top = scorer.top_k(customers[start : start + CHUNK], k)
        width = top.products.shape[1]
        frames.append(
            pd.DataFrame(
                {
                    "customer_id": pd.Series(top.customer_ids).repeat(width).to_numpy(),
                    "rank": list(range(1, width + 1)) * len(top.customer_ids),
                    "product_id": top.products.reshape(-1),
                    "score": top.scores.reshape(-1),
                    "model_version": scorer.version_id,
                    "known_customer": top.known.repeat(width),
                }
            )
        )
    seconds = time.perf_counter() - began
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    return BatchResult(rows, len(customers), seconds)


def read_customers(path: Path) -> list[str]:
    """Customer ids from a text file (one per line) or a CSV/Parquet with ``customer_id``."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            frame = pd.read_parquet(path)
        elif name.endswith((".csv", ".csv.gz")):
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            ids = [line.strip() for line in lines if line.strip()]
            frame = pd.DataFrame({CUSTOMER_ID: ids})
    except FileNotFoundError:
        raise DataValidationError("the file does not exist", file=str(path)) from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"cannot read customer ids: {exc}", file=str(path)) from None
    if CUSTOMER_ID not in frame.columns:
        raise DataValidationError(
            f"no {CUSTOMER_ID!r} column (found {list(frame.columns)})", file=str(path)
        )
    ids = frame[CUSTOMER_ID].astype(str).str.strip()
    empty = ids.index[ids == ""]
    if len(empty):
        raise DataValidationError(
            "empty customer id", file=str(path), row=int(empty[0]) + 1, column=CUSTOMER_ID
        )
    if ids.empty:
        raise DataValidationError("no customer ids: the file lists none", file=str(path))
    return list(dict.fromkeys(ids))  # each customer once, in file order


def write_rows(rows: pd.DataFrame, path: Path) -> None:
    """CSV or Parquet by suffix, written aside and renamed (never half a file)."""
    name = path.name.lower()
    if not name.endswith((".csv", ".parquet")):
        raise ConfigError(f"--out {path}: use a .csv or .parquet file name")
    if name.endswith(".csv"):
        data = rows.to_csv(index=False).encode("utf-8")
    else:
        buffer = io.BytesIO()
        rows.to_parquet(buffer, index=False)
        data = buffer.getvalue()
    atomic_write_bytes(path, data)
