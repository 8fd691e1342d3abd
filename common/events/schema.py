"""The merchant event schema: column names, what they mean, and what a valid table holds.

A file must carry the core columns (ids, time, quantity, price). The attribute columns
(category, department, brand) may be empty or absent: every canonical table has them, as
``""`` where unknown. ``label`` is optional in a file and in the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import pandas as pd

from common.errors import ConfigError

MERCHANT_ID = "merchant_id"
CUSTOMER_ID = "customer_id"
PRODUCT_ID = "product_id"
TIMESTAMP = "timestamp"
QUANTITY = "quantity"
PRICE = "price"
CATEGORY = "category"
DEPARTMENT = "department"
BRAND = "brand"
LABEL = "label"

COLUMN_MEANINGS: Mapping[str, str] = {
    MERCHANT_ID: "the merchant (shop) that recorded the event; one federated client each",
    CUSTOMER_ID: "the merchant's own identifier of the buyer (pseudonymous)",
    PRODUCT_ID: "the product bought, in the catalogue shared by the federation",
    TIMESTAMP: "when the purchase happened, UTC",
    QUANTITY: "units bought in this event",
    PRICE: "unit price paid (total paid / quantity)",
    CATEGORY: "product category, '' if unknown",
    DEPARTMENT: "product department, '' if unknown",
    BRAND: "product brand, '' if unknown",
    LABEL: "optional binary target (1 = positive, 0 = negative)",
}

ID_COLUMNS: tuple[str, ...] = (MERCHANT_ID, CUSTOMER_ID, PRODUCT_ID)
CORE_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, TIMESTAMP, QUANTITY, PRICE)
"""Columns every input file must have (``merchant_id`` may come from the file's name)."""
ATTRIBUTE_COLUMNS: tuple[str, ...] = (CATEGORY, DEPARTMENT, BRAND)
"""Descriptive text: may be empty or absent in a file; ``""`` in the table where unknown."""
TEXT_COLUMNS = ATTRIBUTE_COLUMNS
REQUIRED_COLUMNS: tuple[str, ...] = (*CORE_COLUMNS, *ATTRIBUTE_COLUMNS)
"""The columns of every canonical table, in order."""
OPTIONAL_COLUMNS: tuple[str, ...] = (LABEL,)
KNOWN_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
KEY_COLUMNS: tuple[str, ...] = (MERCHANT_ID, CUSTOMER_ID, PRODUCT_ID, TIMESTAMP)
SORT_COLUMNS: tuple[str, ...] = (MERCHANT_ID, TIMESTAMP, CUSTOMER_ID, PRODUCT_ID)

DROP = "-"
"""Mapping target that drops a source column (``--map internal_notes=-``)."""

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
TIMESTAMP_DTYPE = "datetime64[ns, UTC]"


class EventFormat(Enum):
    """File formats :func:`common.events.read_events` accepts, chosen by file suffix."""

    CSV = ".csv"
    CSV_GZ = ".csv.gz"
    PARQUET = ".parquet"


def as_utc(value: pd.Timestamp) -> pd.Timestamp:
    """Naive times are UTC; aware ones are converted."""
    return value.tz_localize("UTC") if value.tzinfo is None else value.tz_convert("UTC")


_EARLIEST = pd.Timestamp("1990-01-01", tz="UTC")
_LATEST = pd.Timestamp("2100-01-01", tz="UTC")


@dataclass(frozen=True)
class TimeBounds:
    """Accepted timestamp range [earliest, latest): catches epoch-zero and typo years."""

    earliest: pd.Timestamp = _EARLIEST
    latest: pd.Timestamp = _LATEST

    def __post_init__(self) -> None:
        for name in ("earliest", "latest"):
            value = pd.Timestamp(getattr(self, name))
            object.__setattr__(self, name, as_utc(value))
        if not self.earliest < self.latest:
            raise ConfigError(
                f"timestamp bounds: earliest {self.earliest} must be before latest {self.latest}"
            )

    def describe(self) -> str:
        return f"{self.earliest:%Y-%m-%d %H:%M:%S}..{self.latest:%Y-%m-%d %H:%M:%S} UTC"


DEFAULT_BOUNDS = TimeBounds()


@dataclass(frozen=True)
class EventSummary:
    """What a person checks first after an import: sizes and the time range."""

    rows: int
    merchants: int
    customers: int
    products: int
    first: pd.Timestamp
    last: pd.Timestamp
    has_label: bool

    def lines(self) -> list[str]:
        return [
            f"rows:      {self.rows:,}",
            f"merchants: {self.merchants:,}",
            f"customers: {self.customers:,}",
            f"products:  {self.products:,}",
            f"from:      {self.first.isoformat()}",
            f"to:        {self.last.isoformat()}",
            f"label:     {'yes' if self.has_label else 'no'}",
        ]


def summarize(frame: pd.DataFrame) -> EventSummary:
    """Summary of a canonical frame (customers are counted per merchant, then summed)."""
    customers = frame.groupby(MERCHANT_ID, sort=False)[CUSTOMER_ID].nunique().sum()
    return EventSummary(
        rows=len(frame),
        merchants=int(frame[MERCHANT_ID].nunique()),
        customers=int(customers),
        products=int(frame[PRODUCT_ID].nunique()),
        first=frame[TIMESTAMP].min(),
        last=frame[TIMESTAMP].max(),
        has_label=LABEL in frame.columns,
    )
