"""``fedshop model``: inspect the model registry, promote a version, roll back.

Every command verifies what it prints against the platform's public key (``--verify-key``):
a version whose manifest was altered makes the command fail with the integrity exit code.
No command creates a registry: a mistyped ``--registry`` is an error, not a new empty one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.keys import load_verify_key
from server.registry import ModelRegistry, ModelVersion


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "model",
        help="list, inspect, promote and roll back model versions (docs/online.md)",
        description="The signed model registry: every command verifies what it reads with "
        "the platform's public key and fails with the integrity exit code on a mismatch.",
    )
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", type=Path, required=True, help="registry directory")
    common.add_argument(
        "--verify-key", type=Path, required=True, help="the platform's Ed25519 public key (PEM)"
    )

    listing = sub.add_parser(
        "list",
        parents=[common],
        help="all versions, oldest first",
        description="All versions, oldest first; * marks the one being served.",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_list)

    show = sub.add_parser(
        "show",
        parents=[common],
        help="one version's signed manifest fields",
        description="One version's manifest, weights hash and gate decisions, as JSON, after "
        "checking its signature and the weights' SHA-256.",
    )
    show.add_argument("id", type=int, help="version id (from model list)")
    show.set_defaults(handler=_show)

    promote = sub.add_parser(
        "promote",
        parents=[common],
        help="serve a version (verified first)",
        description="Serve a version; it is verified first and the promotion is recorded "
        "with its reason.",
    )
    promote.add_argument("id", type=int, help="version id (from model list)")
    promote.add_argument("--reason", required=True, help="why (kept in the promotion history)")
    promote.set_defaults(handler=_promote)

    rollback = sub.add_parser(
        "rollback",
        parents=[common],
        help="serve the previously promoted version again",
        description="Serve the previously promoted version again; recorded with its reason.",
    )
    rollback.add_argument("--reason", required=True, help="why (kept in the promotion history)")
    rollback.set_defaults(handler=_rollback)

    history = sub.add_parser(
        "history",
        parents=[common],
        help="promotions and rollbacks",
        description="Every promotion and rollback in order, with time, version and reason.",
    )
    history.set_defaults(handler=_history)


def _open(args: argparse.Namespace) -> ModelRegistry:
    return ModelRegistry(
        args.registry,
        signing_key=None,
        verify_key=load_verify_key(args.verify_key),
        create=False,
    )


def _as_dict(version: ModelVersion, *, promoted: bool) -> dict[str, Any]:
    return {
        "id": version.id,
        "parent": version.parent,
        "round": version.round,
        "created_at": version.created_at,
        "merchants": list(version.merchants),
        "metrics": dict(version.metrics),
        "privacy_epsilon": dict(version.privacy),
        "weights_file": str(version.weights_file),
        "weights_sha256": version.weights_sha256,
        "arrays": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in version.arrays.items()},
        "promoted": promoted,
    }


def _list(args: argparse.Namespace) -> int:
    registry = _open(args)
    current = registry.promoted()
    versions = registry.list()
    if args.json:
        rows = [_as_dict(v, promoted=current is not None and v.id == current.id) for v in versions]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':>5} {'parent':>6} {'round':>5}  {'merchants':>9}  {'max eps':>7}  metrics")
    for v in versions:
        mark = "*" if current is not None and v.id == current.id else " "
        metrics = " ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items()))
        max_eps = max(v.privacy.values(), default=0.0)
        parent = "-" if v.parent is None else str(v.parent)
        count = len(v.merchants)
        print(f"{v.id:>4}{mark} {parent:>6} {v.round:>5}  {count:>9}  {max_eps:>7.3g}  {metrics}")
    if not versions:
        print("(no versions)")
    return 0


def _show(args: argparse.Namespace) -> int:
    registry = _open(args)
    registry.load_arrays(args.id)  # checks the weights' hash as well as the manifest signature
    current = registry.promoted()
    version = registry.get(args.id)
    payload = _as_dict(version, promoted=current is not None and current.id == version.id)
    payload["verified"] = "manifest signature and weights SHA-256"
    payload["gate"] = [
        {"compared_with": current_id, "promoted": promoted, "reason": reason}
        for _, current_id, promoted, reason in registry.gate_history(version.id)
    ]
    print(json.dumps(payload, indent=2))
    return 0


def _promote(args: argparse.Namespace) -> int:
    version = _open(args).promote(args.id, reason=args.reason)
    print(f"promoted version {version.id} (round {version.round}): {args.reason}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    version = _open(args).rollback(reason=args.reason)
    print(f"rolled back: version {version.id} (round {version.round}) serves again")
    return 0


def _history(args: argparse.Namespace) -> int:
    for entry in _open(args).history():
        print(
            f"{entry.seq:>4} {entry.at} {entry.action.value:<8} v{entry.version_id}  {entry.reason}"
        )
    return 0
