"""Canonical JSON: the one serialisation of everything fedshop hashes or signs.

Sorted keys, no spaces, ASCII only (``\\uXXXX`` escapes), no NaN or infinity, and floats as
Python's shortest round-trip ``repr``. Two writers that disagree by one byte break every
signature and hash chain silently, so every hashed or signed byte string comes from here.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json_text(obj: Any) -> str:
    """The canonical form as text, for storage in a TEXT column or embedding in larger
    canonical text; ``.encode("ascii")`` of it is exactly :func:`canonical_json`."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def canonical_json(obj: Any) -> bytes:
    """The exact bytes that are hashed or signed. ValueError on NaN or infinity."""
    return canonical_json_text(obj).encode("ascii")
