"""The report of benchmarks/quality.py: tables, targets, the epsilon plot, JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.arrays_io import arrays_to_npz
from common.atomic import atomic_write_bytes
from common.nextbasket.model import BasketScorer, shared_arrays
from common.nextbasket.spec import ScorerSpec
from common.rng import numpy_stream

P_TOPFREQ, TIFU = "P-TopFreq", "TIFU-KNN"
CENTRAL = "model, centralised, non-private + personalised"
FEDERATED = "model, federated, DP eps 3 (event) + personalised"
LOCAL_DP = "model, local-only, DP eps 3 (event) + local blend"
LOCAL_NP = "model, local-only, non-private + local blend"
EPSILONS = (1.0, 3.0, 8.0)


@dataclass
class Report:
    methods: dict[str, Any]
    summaries: dict[str, dict[str, Any]]
    merchants: list[str]
    cases: dict[str, int]
    full_ranking_seconds: dict[str, float]
    round_seconds: dict[str, list[float]]
    spec: ScorerSpec
    schedule: Any
    seconds: float
    quick: bool
    missing: list[str]


def _cell(summary: dict[str, Any], metric: str) -> str:
    value = summary[metric]
    low, high = value["ci95"]
    return f"{value['mean']:.4f} [{low:.4f}, {high:.4f}]"


def _ndcg(report: Report, name: str) -> float:
    return float(report.summaries[name]["ndcg@10"]["mean"])


def _merchant(report: Report, name: str, merchant: str) -> float:
    return float(report.summaries[name]["per_merchant_ndcg@10"][merchant]["mean"])


def sizes(spec: ScorerSpec) -> dict[str, int]:
    arrays = shared_arrays(BasketScorer(spec))
    return {
        "shared_parameters": int(sum(a.size for a in arrays.values())),
        "update_bytes_npz": len(arrays_to_npz(arrays)),
        "float32_bytes": int(sum(a.nbytes for a in arrays.values())),
    }


def targets(report: Report, paired: Callable[..., dict[str, float]]) -> dict[str, Any]:
    """The issue's targets, computed where the needed methods exist."""
    have = set(report.summaries)
    out: dict[str, Any] = {}
    rng = numpy_stream(0, "bootstrap", "targets")
    if {CENTRAL, P_TOPFREQ, TIFU} <= have:
        central, ptop, tifu = _ndcg(report, CENTRAL), _ndcg(report, P_TOPFREQ), _ndcg(report, TIFU)
        out["central_vs_p_topfreq"] = central / ptop - 1
        out["central_above_tifu"] = central > tifu
        out["central_per_merchant_10pct_above_p_topfreq"] = sum(
            _merchant(report, CENTRAL, m) >= 1.1 * _merchant(report, P_TOPFREQ, m)
            for m in report.merchants
        )
    if {FEDERATED, P_TOPFREQ, TIFU, LOCAL_DP} <= have:
        rows = []
        for m in report.merchants:
            bars = {n: _merchant(report, n, m) for n in (P_TOPFREQ, TIFU, LOCAL_DP)}
            best = max(bars, key=bars.__getitem__)
            fed = _merchant(report, FEDERATED, m)
            row = {
                "merchant": m,
                "federated": fed,
                "p_topfreq": bars[P_TOPFREQ],
                "best_local": best,
                "best_local_value": bars[best],
                "vs_best_local": paired(report.methods[FEDERATED], report.methods[best], m, rng),
                "vs_p_topfreq": paired(
                    report.methods[FEDERATED], report.methods[P_TOPFREQ], m, rng
                ),
            }
            if LOCAL_NP in have:
                row["local_non_private"] = _merchant(report, LOCAL_NP, m)
            rows.append(row)
        out["per_merchant"] = rows
        out["federated_at_or_above_p_topfreq"] = sum(r["federated"] >= r["p_topfreq"] for r in rows)
        out["federated_above_best_local"] = sum(
            r["federated"] > r["best_local_value"] for r in rows
        )
        out["per_seed"] = _per_seed_counts(report)
    if {FEDERATED, CENTRAL} <= have:
        out["federated_share_of_central"] = _ndcg(report, FEDERATED) / _ndcg(report, CENTRAL)
    return out


def _per_seed_counts(report: Report) -> list[dict[str, int]]:
    """The per-merchant counts on each seed alone, the trained methods paired by seed (the
    baselines are deterministic: one seed). How much they move from seed to seed is how much
    a count of merchants can say."""

    def value(name: str, seed: int, merchant: str) -> float:
        seeds = report.methods[name].seeds
        return float(np.nanmean(seeds[min(seed, len(seeds) - 1)][merchant]["ndcg@10"]))

    rows = []
    for seed in range(len(report.methods[FEDERATED].seeds)):
        row = {"seed": seed, "federated_at_or_above_p_topfreq": 0, "federated_above_best_local": 0}
        if CENTRAL in report.methods:
            row["central_above_best_local"] = 0
        for m in report.merchants:
            ptop = value(P_TOPFREQ, seed, m)
            best = max(value(n, seed, m) for n in (P_TOPFREQ, TIFU, LOCAL_DP))
            fed = value(FEDERATED, seed, m)
            row["federated_at_or_above_p_topfreq"] += fed >= ptop
            row["federated_above_best_local"] += fed > best
            if CENTRAL in report.methods:
                row["central_above_best_local"] += value(CENTRAL, seed, m) > best
        rows.append(row)
    return rows


def _method_table(report: Report) -> list[str]:
    lines = [
        "| method | seeds | NDCG@10 [95% CI] | Recall@10 [95% CI] | NDCG@20 | Recall@20 "
        "| NDCG@10 repeat | NDCG@10 explore | sampled NDCG@10 (1+99) | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report.summaries.items():
        lines.append(
            f"| {name} | {s['seeds']} | {_cell(s, 'ndcg@10')} | {_cell(s, 'recall@10')} "
            f"| {s['ndcg@20']['mean']:.4f} | {s['recall@20']['mean']:.4f} "
            f"| {s['ndcg@10:repeat']['mean']:.4f} | {s['ndcg@10:explore']['mean']:.4f} "
            f"| {s['sampled-ndcg@10']:.4f} | {s['seconds']:.0f} |"
        )
    return lines


def _merchant_table(report: Report) -> list[str]:
    chosen = [
        n
        for n in (
            P_TOPFREQ,
            TIFU,
            "ALS (implicit, central, non-private)",
            CENTRAL,
            LOCAL_NP,
            LOCAL_DP,
            "model, federated, DP eps 3 (event)",
            "model, federated, DP eps 3 (event) + local blend",
            FEDERATED,
        )
        if n in report.summaries
    ]
    lines = [
        "| merchant | test cases | " + " | ".join(chosen) + " |",
        "|---|---|" + "---|" * len(chosen),
    ]
    for m in report.merchants:
        cells = []
        for n in chosen:
            value = report.summaries[n]["per_merchant_ndcg@10"][m]
            cells.append(f"{value['mean']:.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]")
        lines.append(f"| {m} | {report.cases[m]} | " + " | ".join(cells) + " |")
    return lines


def _target_lines(found: dict[str, Any], merchants: int) -> list[str]:
    lines = []
    if "central_vs_p_topfreq" in found:
        lift = found["central_vs_p_topfreq"]
        lines.append(
            f"- Centralised non-private model vs P-TopFreq, overall NDCG@10: **{lift:+.1%}** "
            f"(target >= +10%: {'met' if lift >= 0.10 else 'NOT met'}); above TIFU-KNN: "
            f"**{'yes' if found['central_above_tifu'] else 'no'}**; merchants where it is at "
            f"least 10% above P-TopFreq: {found['central_per_merchant_10pct_above_p_topfreq']}"
            f" of {merchants}."
        )
    if "per_merchant" in found:
        at = found["federated_at_or_above_p_topfreq"]
        above = found["federated_above_best_local"]
        lines.append(
            f"- Federated DP eps 3 (event) + personalised at or above P-TopFreq: **{at} of "
            f"{merchants}** merchants (target: all); above the best local-only method (TIFU-KNN, "
            f"P-TopFreq or local-only DP eps 3, best per merchant on the test cases): **{above} "
            f"of {merchants}** (target >= 8 of 10)."
        )
        seeds = found["per_seed"]
        if len(seeds) > 1:

            def counts(key: str) -> str:
                return ", ".join(str(row[key]) for row in seeds)

            line = (
                f"  On each seed alone (federated and local-only DP paired by seed): at or above "
                f"P-TopFreq {counts('federated_at_or_above_p_topfreq')}; above the best "
                f"local-only method {counts('federated_above_best_local')} of {merchants}"
            )
            if "central_above_best_local" in seeds[0]:
                line += (
                    f"; the centralised non-private model above the best local-only method "
                    f"{counts('central_above_best_local')} of {merchants}"
                )
            lines.append(line + ".")
    if "federated_share_of_central" in found:
        share = found["federated_share_of_central"]
        lines.append(
            f"- Federated DP eps 3 recovers **{share:.1%}** of the centralised non-private "
            f"NDCG@10 (target >= 90%: {'met' if share >= 0.9 else 'NOT met'})."
        )
    return lines


def _paired_table(found: dict[str, Any]) -> list[str]:
    if "per_merchant" not in found:
        return []
    lines = [
        "| merchant | federated DP eps 3 + personalised | P-TopFreq | best local-only "
        "| federated minus best local [95% CI] | federated minus P-TopFreq [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for row in found["per_merchant"]:
        a, b = row["vs_best_local"], row["vs_p_topfreq"]
        lines.append(
            f"| {row['merchant']} | {row['federated']:.4f} | {row['p_topfreq']:.4f} "
            f"| {row['best_local']} {row['best_local_value']:.4f} "
            f"| {a['diff']:+.4f} [{a['ci95_low']:+.4f}, {a['ci95_high']:+.4f}] "
            f"| {b['diff']:+.4f} [{b['ci95_low']:+.4f}, {b['ci95_high']:+.4f}] |"
        )
    return lines


def _plot(report: Report, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "local-only (+ blend)": "model, local-only, {} + local blend",
        "federated (shared weights)": "model, federated, {}",
        "federated + personalised": "model, federated, {} + personalised",
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    drawn = False
    for ax, unit in zip(axes, ("event", "customer"), strict=True):
        for label, pattern in series.items():
            xs, ys = [], []
            for i, eps in enumerate((*EPSILONS, None)):
                key = "non-private" if eps is None else f"DP eps {eps:g} ({unit})"
                name = pattern.format(key)
                if name in report.summaries:
                    xs.append(i)
                    ys.append(_ndcg(report, name))
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
                drawn = True
        for name, style in ((P_TOPFREQ, "--"), (TIFU, ":")):
            if name in report.summaries:
                ax.axhline(_ndcg(report, name), linestyle=style, color="grey", label=name)
        ax.set_xticks(range(4), ["1", "3", "8", "non-private"])
        ax.set_xlabel("epsilon")
        ax.set_title(f"privacy unit: {unit}")
    axes[0].set_ylabel("NDCG@10 (full ranking, test weeks)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _timing_lines(report: Report) -> list[str]:
    ranking = report.full_ranking_seconds
    lines = [
        "- Full-ranking pass (every test household x the store's whole catalogue, shared "
        f"scorer + tie-break): {min(ranking.values()):.2f}-{max(ranking.values()):.2f} s per "
        f"store, {sum(ranking.values()):.1f} s for all {len(ranking)}.",
    ]
    dp = [v for k, vs in report.round_seconds.items() if "DP eps 3 (event)" in k for v in vs]
    cu = [v for k, vs in report.round_seconds.items() if "DP eps 3 (customer)" in k for v in vs]
    npv = [v for k, vs in report.round_seconds.items() if k.startswith("non-private") for v in vs]
    for label, values in (
        ("DP-SGD, event unit, eps 3", dp),
        ("DP-SGD, customer unit, eps 3", cu),
        ("non-private", npv),
    ):
        if values:
            lines.append(
                f"- One local round per store ({report.schedule.local_epochs} epochs), "
                f"{label}: median {np.median(values):.2f} s, max {np.max(values):.2f} s (CPU)."
            )
    return lines


def write_report(report: Report, out: Path, *, paired: Callable[..., dict[str, float]]) -> None:
    found = targets(report, paired)
    size = sizes(report.spec)
    plotted = _plot(report, out / "results_ndcg.png")
    lines = [
        "# Next-basket recommendation: baselines, the two-part model, federation and DP",
        "",
        "Produced by `make bench` (`python benchmarks/quality.py`) in one run "
        f"(jobs of one seed of one setting each, on 2 processes: {report.seconds / 60:.0f} "
        "minutes of job time in all on this 2-core machine"
        f"{', quick mode: one seed, eps 3, event unit only' if report.quick else ''}"
        f"{_missing(report)}). "
        "Data: the 10 busiest Complete Journey stores; train weeks 1-40, validation 41-44, "
        "test 45-53. Protocol (cases, catalogue, ties, new products): "
        "[evaluation.md](evaluation.md). "
        "Mean over test households; 95% intervals from a bootstrap over households "
        "(stratified by merchant overall); trained methods average each case over their seeds.",
        "",
        "## Against the targets",
        "",
        *_target_lines(found, len(report.merchants)),
        "",
        "## Every method",
        "",
        *_method_table(report),
        "",
        "## Per merchant (NDCG@10 [95% CI])",
        "",
        *_merchant_table(report),
        "",
        *(
            ["## Federated DP vs the local bar, paired per merchant", "", *_paired_table(found), ""]
            if "per_merchant" in found
            else []
        ),
        *(
            ["## NDCG@10 against epsilon", "", "![NDCG@10 vs epsilon](results_ndcg.png)", ""]
            if plotted
            else []
        ),
        "## Sizes and timings",
        "",
        f"- Shared parameters: {size['shared_parameters']:,} float32 "
        f"({size['float32_bytes']:,} bytes; {size['update_bytes_npz']:,} bytes per update as npz).",
        *_timing_lines(report),
        "",
        f"Schedule: {asdict(report.schedule)}; scorer: {asdict(report.spec)}.",
        "",
        "Raw figures: [results.json](results.json).",
    ]
    payload = {
        "summaries": report.summaries,
        "targets": found,
        "sizes": size,
        "full_ranking_seconds": report.full_ranking_seconds,
        "round_seconds": report.round_seconds,
        "schedule": asdict(report.schedule),
        "spec": asdict(report.spec),
        "seconds": report.seconds,
        "missing_jobs": report.missing,
        "cases": report.cases,
    }
    atomic_write_bytes(
        out / "results.json",
        json.dumps(payload, indent=1, default=_plain).encode(),
    )
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())


def _missing(report: Report) -> str:
    if not report.missing:
        return ""
    return (
        "; this report holds the jobs that had finished: not yet run are "
        + ", ".join(report.missing)
        + " (the seeds column says how many seeds each method has)"
    )


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
