"""Per-round checkpoints: model, strategy state and history, written atomically.

A checkpoint is a NumPy archive (loaded with ``allow_pickle=False``) plus a JSON manifest
holding its SHA-256; ``latest.json`` is replaced last, so a crash at any point leaves the
previous checkpoint as the one a resume finds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.arrays_io import arrays_to_npz, npz_to_arrays
from common.atomic import atomic_write_bytes
from common.errors import CheckpointError, IntegrityError

Arrays = dict[str, np.ndarray]

__all__ = ["Checkpoint", "load_latest", "save_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    round: int
    run_id: str
    config_sha256: str
    model: Arrays
    strategy_state: Arrays
    history: list[dict[str, Any]]


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    payload = {f"model/{k}": v for k, v in checkpoint.model.items()}
    payload.update({f"strategy/{k}": v for k, v in checkpoint.strategy_state.items()})
    data = arrays_to_npz(payload)
    name = f"round-{checkpoint.round:04d}"
    atomic_write_bytes(directory / f"{name}.npz", data)
    manifest = {
        "round": checkpoint.round,
        "run_id": checkpoint.run_id,
        "config_sha256": checkpoint.config_sha256,
        "archive": f"{name}.npz",
        "archive_sha256": hashlib.sha256(data).hexdigest(),
        "history": checkpoint.history,
    }
    atomic_write_bytes(directory / f"{name}.json", json.dumps(manifest, indent=1).encode())
    atomic_write_bytes(
        directory / "latest.json", json.dumps({"checkpoint": f"{name}.json"}).encode()
    )
    return directory / f"{name}.json"


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise CheckpointError(f"{what} {path} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{what} {path} holds a JSON {type(value).__name__}; expected a JSON object"
        )
    return value


def _field(path: Path, data: dict[str, Any], name: str, kind: type, expected: str) -> Any:
    """``data[name]`` if it is a ``kind``; otherwise an error naming the file and field."""
    if name not in data:
        raise CheckpointError(f"{path}: field {name!r} is missing; expected {expected}")
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"{path}: field {name!r} is {value!r}; expected {expected}")
    return value


def _plain_name(path: Path, name: str, field: str) -> str:
    """A file name inside the checkpoint directory, never a path out of it."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(
            f"{path}: field {field!r} is {name!r}; expected a file name in {path.parent}"
        )
    return name


def load_latest(directory: Path) -> Checkpoint | None:
    """The checkpoint ``latest.json`` points to, verified against its hash; None if there is
    none yet. A damaged pointer or manifest is named with the field that is wrong."""
    pointer = directory / "latest.json"
    if not pointer.exists():
        return None
    latest = _read_json_object(pointer, "checkpoint pointer")
    name = _field(pointer, latest, "checkpoint", str, "the name of a round-NNNN.json manifest")
    manifest_path = directory / _plain_name(pointer, name, "checkpoint")
    manifest = _read_json_object(manifest_path, "checkpoint manifest")
    sha_text = "a SHA-256 as 64 hex digits"
    archive = _plain_name(
        manifest_path,
        _field(manifest_path, manifest, "archive", str, "the name of a .npz archive"),
        "archive",
    )
    expected_sha = _field(manifest_path, manifest, "archive_sha256", str, sha_text)
    round_number = _field(manifest_path, manifest, "round", int, "a round number (integer)")
    run_id = _field(manifest_path, manifest, "run_id", str, "the run id (string)")
    config_sha = _field(manifest_path, manifest, "config_sha256", str, sha_text)
    history = _field(manifest_path, manifest, "history", list, "a list of per-round records")
    try:
        data = (directory / archive).read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint archive {directory / archive} cannot be read: {exc.strerror}"
        ) from None
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise IntegrityError(f"{directory / archive} does not match its manifest hash")
    arrays = npz_to_arrays(data)
    return Checkpoint(
        round=round_number,
        run_id=run_id,
        config_sha256=config_sha,
        model={k[6:]: v for k, v in arrays.items() if k.startswith("model/")},
        strategy_state={k[9:]: v for k, v in arrays.items() if k.startswith("strategy/")},
        history=list(history),
    )
