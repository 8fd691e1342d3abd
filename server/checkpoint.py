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


def load_latest(directory: Path) -> Checkpoint | None:
    pointer = directory / "latest.json"
    if not pointer.exists():
        return None
    try:
        manifest_path = directory / json.loads(pointer.read_text())["checkpoint"]
        manifest = json.loads(manifest_path.read_text())
        data = (directory / manifest["archive"]).read_bytes()
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint in {directory} is unreadable: {exc}") from None
    if hashlib.sha256(data).hexdigest() != manifest["archive_sha256"]:
        raise IntegrityError(f"{directory / manifest['archive']} does not match its manifest hash")
    arrays = npz_to_arrays(data)
    return Checkpoint(
        round=int(manifest["round"]),
        run_id=str(manifest["run_id"]),
        config_sha256=str(manifest["config_sha256"]),
        model={k[6:]: v for k, v in arrays.items() if k.startswith("model/")},
        strategy_state={k[9:]: v for k, v in arrays.items() if k.startswith("strategy/")},
        history=list(manifest["history"]),
    )
