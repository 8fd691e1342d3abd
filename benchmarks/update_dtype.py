"""Update size: merchants' replies with float32 versus float16 weights (federation.update_dtype).

Three measurements, each of both dtypes:

1. ``bytes``: a synthetic federation through Flower's simulation engine, as benchmarks/scale.py
   runs it (the same small model, DP on), once per dtype: the Flower protobuf bytes the platform
   sends and receives per merchant per training round, and the time per merchant-round;
2. ``model``: the protobuf size of the weights alone (an ArrayRecord of the shared arrays) for
   the model of the scale runs and for the default (production) model, computed, not run;
3. ``quality``: one federation provisioned once and copied, so that both runs have the same
   merchants, data, run id and DP secrets, hence the same records, batches and noise: the only
   difference is the rounding of each released model to float16. Both run in process (the
   same ClientApp, no Ray); compared are the final test NDCG@10 (overall, 95 % interval, per
   merchant), the per-round validation NDCG@10 and how far apart the final models are.

Writes docs/update_dtype.json and rewrites docs/scale.md (its section "Update size: float32
vs float16" comes from that file).

Usage: python benchmarks/update_dtype.py [--parts bytes,model,quality] [--merchants 10]
[--rounds 2] [--quality-set KEY=VALUE ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = ROOT / "docs" / "update_dtype.json"
DTYPES = ("float32", "float16")
# The default run configuration (the 10 busiest Complete Journey stores, the default model,
# 6 rounds, DP-SGD at epsilon 3), validated after every round.
QUALITY_OVERRIDES = ["evaluation.every_round=true"]


def bytes_part(merchants: int, rounds: int, work: Path) -> dict[str, Any]:
    import scale

    rows = {dtype: scale.measure(merchants, rounds, work, update_dtype=dtype) for dtype in DTYPES}
    keep = (
        "merchants",
        "rounds",
        "sent_bytes_per_merchant_round",
        "received_bytes_per_merchant_round",
        "seconds_per_merchant_round",
        "warm_seconds_per_merchant_round",
        "round_seconds",
        "load_average_1min",
        "other_jobs",
    )
    return {dtype: {key: row[key] for key in keep} for dtype, row in rows.items()}


def weights_bytes(overrides: list[str]) -> dict[str, Any]:
    """Protobuf bytes of the shared weights as an ArrayRecord, in each dtype."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    from common import protocol as P
    from common.config import RunConfig, UpdateDtype
    from common.configparse import apply_overrides
    from server.federation import initial_model

    arrays = initial_model(RunConfig.from_dict(apply_overrides({}, overrides)))
    sizes = {
        dtype.value: recorddict_to_proto(
            RecordDict({P.ARRAYS: P.to_array_record(P.encode_update(arrays, dtype))})
        ).ByteSize()
        for dtype in UpdateDtype
    }
    return {"parameters": int(sum(a.size for a in arrays.values())), "bytes": sizes}


def model_part() -> dict[str, Any]:
    import scale

    return {
        "scale_model": weights_bytes(list(scale.SCALE_OVERRIDES)),
        "default_model": weights_bytes([]),
    }


def _copy_layout(source: Path, target: Path, update_dtype: str) -> Path:
    """``source`` provisioned run, copied with its merchants' paths moved and the dtype set."""
    from common.config import RunConfig, dump_toml

    shutil.copytree(source, target)
    for toml in (target / "merchants").glob("*/merchant.toml"):
        toml.write_text(toml.read_text().replace(str(source), str(target)))
    config = RunConfig.from_toml(target / "config.toml").to_dict()
    config["federation"]["update_dtype"] = update_dtype
    (target / "config.toml").write_text(dump_toml(config))
    return target


def _run(root: Path) -> dict[str, Any]:
    import numpy as np

    from simulations.provision import RunLayout
    from simulations.runner import Transport, simulate

    began = time.perf_counter()
    result = simulate(RunLayout(root), transport=Transport.IN_PROCESS)
    summary = result.summary
    assert result.arrays is not None, f"the run in {root} did not complete"
    np.savez(root / "final-weights.npz", **result.arrays)
    return {
        "seconds": time.perf_counter() - began,
        "test_ndcg10": summary["test"]["ndcg@10"],
        "test_ci95": summary["test_methods"]["global"]["ci95"]["ndcg@10"],
        "test_cases": summary["test_cases"],
        "test_per_merchant": {
            merchant: means["ndcg@10"] for merchant, means in summary["test_per_merchant"].items()
        },
        "valid_ndcg10_per_round": [row["metrics"].get("ndcg@10") for row in result.history],
        "aggregated_rounds": summary["aggregated_rounds"],
        "failed_per_round": [len(row["failed"]) for row in result.history],
    }


def quality_part(overrides: list[str], work: Path) -> dict[str, Any]:
    import numpy as np

    from common.config import RunConfig
    from common.configparse import apply_overrides
    from simulations.provision import provision

    config = RunConfig.from_dict(apply_overrides({}, [*QUALITY_OVERRIDES, *overrides]))
    began = time.perf_counter()
    base = work / "provisioned"
    shutil.rmtree(work, ignore_errors=True)
    provision(config, base)
    provision_seconds = time.perf_counter() - began
    runs: dict[str, Any] = {}
    for dtype in DTYPES:
        load = os.getloadavg()[0]
        runs[dtype] = _run(_copy_layout(base, work / dtype, dtype))
        runs[dtype]["load_average_1min"] = [load, os.getloadavg()[0]]
    final = {
        dtype: dict(np.load(work / dtype / "final-weights.npz", allow_pickle=False))
        for dtype in DTYPES
    }
    difference = {
        name: float(np.max(np.abs(final["float16"][name] - final["float32"][name])))
        for name in final["float32"]
    }
    squared = sum(
        float(np.sum((final["float32"][n].astype(np.float64)) ** 2)) for n in final["float32"]
    )
    apart = sum(
        float(np.sum((final["float16"][n].astype(np.float64) - final["float32"][n]) ** 2))
        for n in final["float32"]
    )
    return {
        "overrides": [*QUALITY_OVERRIDES, *overrides],
        "merchants": len(runs["float32"]["test_per_merchant"]),
        "provision_seconds": provision_seconds,
        "runs": runs,
        "final_models": {
            "max_abs_difference": max(difference.values()),
            "relative_l2_difference": (apart / squared) ** 0.5,
        },
    }


def _per_round(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.4f}" for v in values)


def section(results: dict[str, Any]) -> list[str]:
    """The docs/scale.md section written from docs/update_dtype.json."""
    lines = [
        "## Update size: float32 vs float16",
        "",
        'With `federation.update_dtype = "float16"` (default `"float32"`) each merchant '
        "rounds its trained weights to float16 before it releases them: the outbox, the "
        "signed ledger entry (`model_out_sha256` hashes the float16 arrays, dtype included) "
        "and the reply all hold the float16 arrays, and the platform's checks (names, shapes, "
        "dtype, NaN/Inf, update norm) apply to the arrays as received. The platform folds them "
        "into its exact running sum (every float16 is exact in float64) and keeps the global "
        "model, and what it sends, in float32. Measured with `python benchmarks/update_dtype.py` "
        "(module docstring: how).",
        "",
    ]
    if "bytes" in results:
        b = results["bytes"]
        f32, f16 = b["float32"], b["float16"]
        share = f16["received_bytes_per_merchant_round"] / f32["received_bytes_per_merchant_round"]
        lines += [
            f"Bytes per merchant per training round, Flower protobuf sizes counted at the "
            f"platform's grid, {f32['merchants']} synthetic merchants, {f32['rounds']} rounds "
            "through Flower's simulation engine (the small model of the table above):",
            "",
            "| update dtype | received KiB / merchant-round | sent KiB / merchant-round "
            "| s per merchant-round (warm) | load (1 min) |",
            "|---|---|---|---|---|",
            *(
                f"| {dtype} | {row['received_bytes_per_merchant_round'] / 1024:.1f} | "
                f"{row['sent_bytes_per_merchant_round'] / 1024:.1f} | "
                f"{row['seconds_per_merchant_round']:.3f} "
                f"({row['warm_seconds_per_merchant_round']:.3f}) | "
                f"{row['load_average_1min'][0]:.1f} -> {row['load_average_1min'][1]:.1f} |"
                for dtype, row in (("float32", f32), ("float16", f16))
            ),
            "",
            f"The reply shrinks to {share:.0%} of its float32 size; what the platform sends "
            "(the float32 global model) does not change. The times are of a shared machine "
            f"(busy beside it: {f32['other_jobs'] or 'no other process'}), not a "
            "comparison.",
            "",
        ]
    if "model" in results:
        m = results["model"]
        lines += [
            "The weights alone (one ArrayRecord of the shared arrays, protobuf bytes, computed):",
            "",
            "| model | parameters | float32 KiB | float16 KiB |",
            "|---|---|---|---|",
            *(
                f"| {label} | {row['parameters']:,} | {row['bytes']['float32'] / 1024:.1f} | "
                f"{row['bytes']['float16'] / 1024:.1f} |"
                for label, row in (
                    ("scale runs (above)", m["scale_model"]),
                    ("default (production)", m["default_model"]),
                )
            ),
            "",
        ]
    if "quality" in results:
        q = results["quality"]
        f32, f16 = q["runs"]["float32"], q["runs"]["float16"]
        delta = f16["test_ndcg10"] - f32["test_ndcg10"]
        lines += [
            f"Quality, paired: one federation of {q['merchants']} merchants "
            f"(`{' '.join(q['overrides'])}` over the default configuration: DP-SGD at "
            "epsilon 3) provisioned once and copied, so "
            "both runs have the same data, run id and DP secrets (the same records, batches "
            "and noise); run in process. The only difference is the rounding of every released "
            "model to float16.",
            "",
            "| update dtype | test NDCG@10 [95% CI] | validation NDCG@10 per round "
            "| run s | load (1 min) |",
            "|---|---|---|---|---|",
            *(
                f"| {dtype} | {row['test_ndcg10']:.4f} [{row['test_ci95'][0]:.4f}, "
                f"{row['test_ci95'][1]:.4f}] | "
                f"{_per_round(row['valid_ndcg10_per_round'])} | "
                f"{row['seconds']:.0f} | {row['load_average_1min'][0]:.1f} -> "
                f"{row['load_average_1min'][1]:.1f} |"
                for dtype, row in (("float32", f32), ("float16", f16))
            ),
            "",
            f"Test NDCG@10 float16 minus float32: {delta:+.4f} over {f32['test_cases']:.0f} test "
            "cases; per merchant: "
            + ", ".join(
                f"{m} {f16['test_per_merchant'][m] - v:+.4f}"
                for m, v in sorted(f32["test_per_merchant"].items())
            )
            + ". The final global models differ by at most "
            f"{q['final_models']['max_abs_difference']:.2g} in any weight (relative L2 "
            f"difference {q['final_models']['relative_l2_difference']:.2g}).",
            "",
        ]
    lines += [
        "Why the default stays float32: what is rounded is the weights, not their change in "
        "the round, so a weight moves only in steps of float16's spacing at its magnitude "
        "(2^-10, about 0.001, for weights between 1 and 2): a round whose change to a weight "
        "is below half of that leaves it where it was. With the default training (Adam, "
        "learning rate 0.01, DP noise) the changes are far larger, and the runs above agree; "
        "with small learning rates or long fine-tuning they may not. float16 is for links "
        "where the reply's bytes matter, after checking the quality on one's own data.",
        "",
        "Privacy: rounding to float16 happens after DP-SGD has added its noise, on the "
        "released weights only: it is post-processing, so every epsilon and delta the ledger "
        "records stays exactly as it is. The merchant's secret-keyed randomness is the same "
        "in both dtypes.",
        "",
        "Values beyond float16's range (|w| > 65504) do not become infinite: the merchant "
        "saturates them at +-65504 (still post-processing: the ledger entry hashes and the "
        "reply carries the saturated arrays, so the release is recorded), logs a warning, and "
        "the platform refuses any float16 update with a value at +-65504 ('values at "
        "float16's limit ... run with federation.update_dtype = float32'), as it refuses NaN "
        "and Inf. The model's weights are far inside that range (the update-norm bound, "
        "`federation.max_update_norm`, is 1e4 by default).",
        "",
    ]
    return lines


def main() -> int:
    from common.flower_env import quiet_flower_environment

    quiet_flower_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="bytes,model,quality")
    parser.add_argument("--merchants", type=int, default=10, help="bytes: synthetic merchants")
    parser.add_argument("--rounds", type=int, default=2, help="bytes: rounds")
    parser.add_argument(
        "--quality-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="quality: a configuration override on top of "
        f"{' '.join(QUALITY_OVERRIDES)} (e.g. data.source=synthetic)",
    )
    parser.add_argument("--work", type=Path, help="run directories (default: a temp dir)")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"bytes", "model", "quality"}:
        parser.error("--parts names some of bytes, model, quality")
    work = args.work or Path(tempfile.mkdtemp(prefix="fedshop-update-dtype-"))
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    try:
        if "model" in parts:
            results["model"] = model_part()
        if "bytes" in parts:
            results["bytes"] = bytes_part(args.merchants, args.rounds, work / "bytes")
        if "quality" in parts:
            results["quality"] = quality_part(args.quality_set, work / "quality")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["cpus"] = os.cpu_count()
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    rewrite_scale_md()
    print(json.dumps(results, indent=1))
    return 0


def rewrite_scale_md() -> None:
    """docs/scale.md from docs/scale.json, now with this comparison (the plot is left alone)."""
    import scale

    earlier = json.loads((scale.DOCS / "scale.json").read_text())
    rows = [scale.with_load(row, earlier["context"]) for row in earlier["rows"]]
    (scale.DOCS / "scale.md").write_text(scale.report(rows, earlier["context"]))


if __name__ == "__main__":
    raise SystemExit(main())
