"""Named sections inside a generated Markdown report, so that benchmarks run separately can
each own a part of ``docs/results.md`` without overwriting the others' figures."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.atomic import atomic_write_text


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} begin -->", f"<!-- section:{name} end -->"


def read_section(path: Path, name: str) -> str | None:
    """The marked block of ``path`` (markers included), or None if absent."""
    if not path.exists():
        return None
    begin, end = _markers(name)
    found = re.search(re.escape(begin) + r".*?" + re.escape(end), path.read_text(), re.DOTALL)
    return found.group(0) if found else None


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the marked block; the file is swapped in whole, never half-written."""
    begin, end = _markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    current = read_section(path, name)
    if current is not None:
        text = text.replace(current, block)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text.rstrip("\n") + "\n")
