"""The merchant event schema: one canonical table that every other part of fedshop reads.

A merchant's purchase log becomes a pandas DataFrame with fixed column names, dtypes and
constraints (:mod:`common.events.schema`). :func:`validate_events`
(:mod:`common.events.validate`) is the single gate into that form; :mod:`common.events.io`
reads and writes files through it.
"""

from common.events.io import (
    ImportReport,
    event_format,
    import_events,
    read_events,
    write_events,
)
from common.events.schema import (
    ATTRIBUTE_COLUMNS,
    BRAND,
    CATEGORY,
    COLUMN_MEANINGS,
    CORE_COLUMNS,
    CUSTOMER_ID,
    DEFAULT_BOUNDS,
    DEFAULT_MAX_BYTES,
    DEPARTMENT,
    DROP,
    ID_COLUMNS,
    KEY_COLUMNS,
    KNOWN_COLUMNS,
    LABEL,
    MERCHANT_ID,
    OPTIONAL_COLUMNS,
    PRICE,
    PRODUCT_ID,
    QUANTITY,
    REQUIRED_COLUMNS,
    SORT_COLUMNS,
    TEXT_COLUMNS,
    TIMESTAMP,
    TIMESTAMP_DTYPE,
    EventFormat,
    EventSummary,
    TimeBounds,
    summarize,
)
from common.events.validate import apply_mapping, validate_events

__all__ = [
    "ATTRIBUTE_COLUMNS",
    "BRAND",
    "CATEGORY",
    "COLUMN_MEANINGS",
    "CORE_COLUMNS",
    "CUSTOMER_ID",
    "DEFAULT_BOUNDS",
    "DEFAULT_MAX_BYTES",
    "DEPARTMENT",
    "DROP",
    "ID_COLUMNS",
    "KEY_COLUMNS",
    "KNOWN_COLUMNS",
    "LABEL",
    "MERCHANT_ID",
    "OPTIONAL_COLUMNS",
    "PRICE",
    "PRODUCT_ID",
    "QUANTITY",
    "REQUIRED_COLUMNS",
    "SORT_COLUMNS",
    "TEXT_COLUMNS",
    "TIMESTAMP",
    "TIMESTAMP_DTYPE",
    "EventFormat",
    "EventSummary",
    "ImportReport",
    "TimeBounds",
    "apply_mapping",
    "event_format",
    "import_events",
    "read_events",
    "summarize",
    "validate_events",
    "write_events",
]
