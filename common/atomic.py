"""All-or-nothing file writes, the only way fedshop writes a file that must survive a crash.

Each write goes to a temporary file in the target's directory, is flushed and fsynced, renamed
over the target, and the directory is fsynced so the rename itself survives power loss. A
reader sees the old file or the new one, never half of one; on any error the temporary file is
removed and the target is untouched. Temporary files are created with mode 0600 and keep it
unless ``mode`` says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

Writer = Callable[[IO[bytes]], object]  # its return value is ignored


def _fsync_directory(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable (a no-op where the OS cannot)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(path: Path, write: Writer, mode: int | None) -> Path:
    """A fsynced temporary file beside ``path`` holding what ``write`` wrote."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_with(path: Path, write: Writer, *, mode: int | None = None) -> None:
    """Replace ``path`` with whatever ``write`` writes to the binary handle it is given
    (for writers that stream, such as ``DataFrame.to_parquet``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data``."""
    atomic_write_with(path, lambda handle: handle.write(data), mode=mode)


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(
    path: Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = True
) -> None:
    """Replace ``path`` with ``obj`` as human-readable JSON and a final newline (reports and
    state files; hashed or signed JSON comes from :mod:`common.canonical`)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def atomic_create(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` holding ``data`` with ``mode``, all or nothing; FileExistsError if it
    exists. The complete file is hard-linked into place, so there is no moment at which an
    existing file (a key, say) could be replaced or a half-written one seen."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, lambda handle: handle.write(data), mode)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
