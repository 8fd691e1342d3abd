"""common.atomic: the one writer of files that must survive a crash."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO

import pytest

import common.atomic as atomic
from common.atomic import (
    atomic_create,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_each_variant_writes_exactly_its_content(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\xffdata")
    atomic_write_text(tmp_path / "b.txt", "grüße\n")
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1.5, None]})
    atomic_write_json(tmp_path / "d.json", {"b": 1, "a": 2}, indent=None, sort_keys=False)
    atomic_write_with(tmp_path / "e.bin", lambda handle: handle.write(b"streamed"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xffdata"
    assert (tmp_path / "b.txt").read_bytes() == "grüße\n".encode()
    pretty = '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    assert (tmp_path / "c.json").read_text() == pretty
    assert (tmp_path / "d.json").read_text() == '{"b": 1, "a": 2}\n'
    assert (tmp_path / "e.bin").read_bytes() == b"streamed"
    assert _names(tmp_path) == ["a.bin", "b.txt", "c.json", "d.json", "e.bin"]


def test_replaces_an_existing_file_and_creates_missing_folders(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "state.json"
    atomic_write_json(target, {"v": 1})
    atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert _names(target.parent) == ["state.json"]


def test_mode_is_applied(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "public", b"x", mode=0o644)
    atomic_write_bytes(tmp_path / "private", b"x")
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600


def test_failed_write_leaves_old_content_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "model.npz"
    target.write_bytes(b"old")

    def half_then_fail(handle: IO[bytes]) -> None:
        handle.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["model.npz"]


def test_failed_rename_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "occupied").mkdir()  # a non-empty directory cannot be replaced by a file
    (tmp_path / "occupied" / "keep").write_text("x")
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "occupied", b"data")
    assert _names(tmp_path) == ["occupied"]
    assert _names(tmp_path / "occupied") == ["keep"]


def test_unserialisable_json_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert _names(tmp_path) == []


def test_rename_is_made_durable_by_a_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(atomic, "_fsync_directory", synced.append)
    atomic_write_bytes(tmp_path / "a", b"1")
    atomic_create(tmp_path / "b", b"2", mode=0o600)
    assert synced == [tmp_path, tmp_path]


def test_create_writes_a_new_file_with_its_mode(tmp_path: Path) -> None:
    atomic_create(tmp_path / "k.key", b"secret", mode=0o600)
    assert (tmp_path / "k.key").read_bytes() == b"secret"
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert _names(tmp_path) == ["k.key"]


def test_create_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "k.key"
    target.write_bytes(b"original")
    with pytest.raises(FileExistsError):
        atomic_create(target, b"replacement", mode=0o600)
    assert target.read_bytes() == b"original"
    assert _names(tmp_path) == ["k.key"]


def test_create_does_not_follow_or_replace_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / "link")
    with pytest.raises(FileExistsError):
        atomic_create(tmp_path / "link", b"new", mode=0o600)
    assert victim.read_bytes() == b"keep"
