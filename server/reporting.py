"""What a run leaves behind: metrics as CSV and JSON, plots as PNG, and a console table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes


def round_table(history: list[dict[str, Any]]) -> str:
    merchants = sorted({m for row in history for m in row["epsilon"]})
    head = (
        f"{'round':>5} {'cases':>7} {'NDCG@10':>8} {'Rec@10':>7} {'NDCG@20':>8} {'eps max':>8}"
        "  trained/refused/failed"
    )
    lines = ["validation weeks, every household, full catalogue (federated evaluation)", head]
    lines.append("-" * len(head))
    nan = float("nan")
    for row in history:
        m = row["metrics"]
        cases = f"{row.get('evaluation_cases', 0):.0f}"
        lines.append(
            f"{row['round']:>5} {cases:>7} {m.get('ndcg@10', nan):>8.4f} "
            f"{m.get('recall@10', nan):>7.4f} {m.get('ndcg@20', nan):>8.4f} "
            f"{(format(row['epsilon_max'], '.3f') if row['epsilon'] else '-'):>8}  "
            f"{len(row['trained'])}/{len(row['refused'])}/{len(row['failed'])}"
        )
    if merchants and history:
        last = history[-1]["epsilon"]
        lines.append("")
        lines.append("cumulative epsilon per merchant after the last round:")
        lines.extend(f"  {m:<14} {last.get(m, 0.0):.3f}" for m in merchants)
    return "\n".join(lines)


LABELS = {
    "global+local": "federated model",
    "p-topfreq": "P-TopFreq (own purchases)",
    "g-topfreq": "G-TopFreq (best sellers)",
}


def merchant_table(summary: dict[str, Any]) -> str:
    """Test weeks, NDCG@10 per merchant: what the federation gives each merchant (its model
    with its local part) next to what it gets alone with no privacy cost (P-TopFreq)."""
    methods = summary.get("test_methods") or {}
    ours, alone = methods.get("global+local"), methods.get("p-topfreq")
    if not ours or not alone:
        return ""
    head = f"{'merchant':<14} {'cases':>6} {'federated':>10} {'P-TopFreq':>10} {'change':>8}"
    lines = [
        "test period (federated evaluation), NDCG@10 over the full catalogue, "
        "each merchant on its own households",
        head,
    ]
    lines.append("-" * len(head))
    cases = summary.get("test_case_counts", {})
    wins = 0
    for merchant in sorted(ours["per_merchant"]):
        a = ours["per_merchant"][merchant].get("ndcg@10", float("nan"))
        b = alone["per_merchant"].get(merchant, {}).get("ndcg@10", float("nan"))
        wins += a > b
        change = f"{100 * (a - b) / b:+.1f}%" if b > 0 else "-"
        lines.append(
            f"{merchant:<14} {cases.get(merchant, 0):>6.0f} {a:>10.4f} {b:>10.4f} {change:>8}"
        )
    a, b = ours["means"].get("ndcg@10", float("nan")), alone["means"].get("ndcg@10", float("nan"))
    ci_a = ours["ci95"].get("ndcg@10", [float("nan")] * 2)
    ci_b = alone["ci95"].get("ndcg@10", [float("nan")] * 2)
    lines.append("-" * len(head))
    lines.append(
        f"{'all':<14} {summary.get('test_cases', 0):>6.0f} {a:>10.4f} {b:>10.4f} "
        f"{(f'{100 * (a - b) / b:+.1f}%' if b > 0 else '-'):>8}"
    )
    lines.append(
        f"95% intervals: federated [{ci_a[0]:.4f}, {ci_a[1]:.4f}], P-TopFreq "
        f"[{ci_b[0]:.4f}, {ci_b[1]:.4f}]; federated ahead at {wins} of "
        f"{len(ours['per_merchant'])} merchants"
    )
    return "\n".join(lines)


def write_metrics(run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    merchants = sorted({m for row in history for m in row["epsilon"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "round",
            "evaluation_cases",
            "ndcg@10",
            "recall@10",
            "ndcg@20",
            "recall@20",
            "epsilon_max",
            "trained",
            "refused",
            "failed",
            "seconds",
            *[f"epsilon[{m}]" for m in merchants],
        ]
    )
    for row in history:
        m = row["metrics"]
        writer.writerow(
            [
                row["round"],
                row.get("evaluation_cases"),
                m.get("ndcg@10"),
                m.get("recall@10"),
                m.get("ndcg@20"),
                m.get("recall@20"),
                row["epsilon_max"],
                len(row["trained"]),
                len(row["refused"]),
                len(row["failed"]),
                round(row["seconds"], 3),
                *[row["epsilon"].get(x) for x in merchants],
            ]
        )
    atomic_write_bytes(run_dir / "metrics.csv", buffer.getvalue().encode())
    atomic_write_bytes(
        run_dir / "metrics.json",
        json.dumps({"rounds": history, "summary": summary}, indent=1).encode(),
    )


def write_plots(run_dir: Path, history: list[dict[str, Any]], epsilon_cap: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row["round"] for row in history]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("ndcg@10", "recall@10", "ndcg@20"):
        axes[0].plot(rounds, [row["metrics"].get(key) for row in history], marker="o", label=key)
    axes[0].set_xlabel("round")
    axes[0].set_title("shared model, validation weeks, full catalogue")
    axes[0].legend()
    merchants = sorted({m for row in history for m in row["epsilon"]})
    for merchant in merchants:
        axes[1].plot(
            rounds,
            [row["epsilon"].get(merchant, 0.0) for row in history],
            marker=".",
            label=merchant,
        )
    axes[1].axhline(epsilon_cap, color="red", linestyle="--", label="cap")
    axes[1].set_xlabel("round")
    axes[1].set_title("cumulative epsilon per merchant")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(run_dir / "plots" / "rounds.png", buffer.getvalue())
    paths.append(run_dir / "plots" / "rounds.png")
    return paths
