"""Online fine-tuning against its bars, week by week on the held-out weeks of Complete Journey.

Four ways to serve the stream weeks, each scored by the merchants (federated evaluation,
full ranking, the first basket of every household that shops in the week, histories up to the
week):

- **frozen**: the offline model with the households' histories as they were at the end of the
  offline training weeks (nothing refreshed);
- **refreshed features**: the same weights, histories and counts updated every week (free:
  the features are computed at the merchant at scoring time);
- **online fine-tuning**: the promoted model of ``fedshop simulate --online`` (one DP round on
  each weekly inbox cohort, gated);
- **weekly retraining**: a new federation trained from scratch every week on everything before
  that week (its own DP budget over the whole history, so a much larger privacy spend).

Every federation runs through the production code (round loop, acceptance, ledgers, federated
evaluation) on the in-process transport. Writes docs/results_online.md and
docs/results_online.json.

Usage: python benchmarks/online.py [--weeks 41-53] [--retrain-every 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.atomic import atomic_write_bytes  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.configparse import apply_overrides  # noqa: E402

METRIC = "ndcg@10"
BENCH = ["evaluation.every_round=false"]


def _config(extra: list[str]) -> RunConfig:
    return RunConfig.from_dict(apply_overrides({}, [*BENCH, *extra]))


def online_run(first: int, last: int, out: Path) -> dict[str, Any]:
    """Offline rounds, then the stream weeks with the offline model as a reference."""
    from simulations.online import StreamSpec, simulate_online
    from simulations.provision import provision
    from simulations.runner import Transport

    layout = provision(_config([]), out / "online")
    spec = StreamSpec(first, last)
    began = time.perf_counter()
    summary = simulate_online(layout, spec, transport=Transport.IN_PROCESS, reference_offline=True)
    rows = json.loads((layout.root / "online.json").read_text())["weeks"]
    return {"summary": summary, "weeks": rows, "seconds": time.perf_counter() - began}


def retrain_week(week: int, out: Path) -> dict[str, Any]:
    """A federation trained on weeks 1..week-2, validated on week-1, tested on ``week``."""
    from simulations.provision import provision
    from simulations.runner import Transport, simulate

    weeks = [
        f"data.train_weeks=1,{week - 2}",
        f"data.valid_weeks={week - 1},{week - 1}",
        f"data.test_weeks={week},{week}",
    ]
    closed = without_test_events(_config(weeks))
    config = _config(weeks + ([f"data.exclude={','.join(closed)}"] if closed else []))
    began = time.perf_counter()
    result = simulate(provision(config, out / f"retrain-w{week}"), transport=Transport.IN_PROCESS)
    methods = result.summary["test_methods"]
    return {
        "week": week,
        "shared": methods["global"]["means"],
        "with_local_part": methods["global+local"]["means"],
        "p-topfreq": methods["p-topfreq"]["means"],
        "cases": result.summary["test_cases"],
        "left_out": closed,
        "seconds": time.perf_counter() - began,
    }


def without_test_events(config: RunConfig) -> list[str]:
    """Merchants with no events in the test weeks (a store that closed): a retraining for that
    week leaves them out; they have nothing to be scored on there anyway."""
    from common.datasets import load_dataset

    dataset = load_dataset(config)
    return sorted(
        str(merchant)
        for merchant, group in dataset.events.groupby("merchant_id")
        if dataset.split.split(group.reset_index(drop=True))["test"].empty
    )


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def report(online: dict[str, Any], retrained: list[dict[str, Any]], seconds: float) -> str:
    weeks = online["weeks"]
    by_week = {r["week"]: r for r in retrained}
    lines = [
        "# Online fine-tuning against its bars (weekly, full ranking)",
        "",
        f"Produced by `python benchmarks/online.py` in one run ({seconds / 60:.0f} min on 2 "
        "cores). Complete Journey, 10 busiest stores; offline federation on weeks 1-40 (DP, "
        "epsilon 3, event level), then each held-out week streamed through the merchants' "
        "inboxes. Each figure: NDCG@10 over the first basket of every household that shops "
        "in the week, full catalogue, scored by the merchants (federated evaluation). "
        "Weekly retraining: a new federation (same settings, trained on every week before "
        "the week it is tested on) in weeks "
        + ", ".join(str(r["week"]) for r in retrained)
        + "; P-TopFreq is scored in those federations' final test.",
        "",
        "| week | cases | frozen | refreshed features | online fine-tuning | weekly retraining "
        "| P-TopFreq | promoted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    columns: dict[str, list[float]] = {
        k: [] for k in ("frozen", "fresh", "online", "retrain", "ptf")
    }
    for row in weeks:
        refs = row.get("references", {})
        frozen = refs.get("offline@stale", {}).get(METRIC, math.nan)
        fresh = refs.get("offline", {}).get(METRIC, math.nan)
        tuned = row["prequential"].get(METRIC, math.nan)
        retrain = by_week.get(row["week"], {}).get("shared", {}).get(METRIC, math.nan)
        ptf = by_week.get(row["week"], {}).get("p-topfreq", {}).get(METRIC, math.nan)
        for key, value in zip(columns, (frozen, fresh, tuned, retrain, ptf), strict=True):
            columns[key].append(value)
        lines.append(
            f"| {row['week']} | {row['prequential_cases']:.0f} | {frozen:.4f} | {fresh:.4f} | "
            f"{tuned:.4f} | {_cell(retrain)} | {_cell(ptf)} | "
            f"{'yes' if row['promoted'] else 'no'} |"
        )
    means = {k: _mean(v) for k, v in columns.items()}
    # the retrainings' weeks, every column on the same weeks: the fair comparison with them
    on_retrained = [i for i, value in enumerate(columns["retrain"]) if math.isfinite(value)]
    same = {k: _mean([v[i] for i in on_retrained]) for k, v in columns.items()}
    lines += [
        f"| mean, every week | | {means['frozen']:.4f} | {means['fresh']:.4f} | "
        f"{means['online']:.4f} | | | |",
        f"| mean, the {len(on_retrained)} retraining weeks | | {same['frozen']:.4f} | "
        f"{same['fresh']:.4f} | {same['online']:.4f} | {same['retrain']:.4f} | "
        f"{same['ptf']:.4f} | |",
        "",
        "## Reading",
        "",
        f"- Refreshing the merchants' features alone (no training, no privacy cost) moves the "
        f"weekly mean from {means['frozen']:.4f} (frozen) to {means['fresh']:.4f}.",
        f"- Online fine-tuning on top of refreshed features: {means['online']:.4f} "
        f"({_relative(means['online'], means['fresh'])} against refreshed features, the bar it "
        "has to beat).",
        f"- Weekly retraining from scratch, on the weeks it was run: {same['retrain']:.4f} "
        f"against {same['fresh']:.4f} with refreshed features "
        f"({_relative(same['retrain'], same['fresh'])}) and {same['online']:.4f} with online "
        f"fine-tuning ({_relative(same['retrain'], same['online'])}), at "
        f"{_mean([r['seconds'] for r in retrained]):.0f} s of training per week and a new DP "
        "spend over the whole history every week (the offline budget again, each week).",
        "- Each retraining is a federation of the merchants with events in its test week: "
        + (
            "; ".join(
                f"week {r['week']} without {', '.join(r['left_out'])}"
                for r in retrained
                if r.get("left_out")
            )
            or "every week had all of them"
        )
        + ".",
        f"- Promotions: {sum(1 for r in weeks if r['promoted'])} of "
        f"{sum(1 for r in weeks if r['candidate'] is not None)} candidates.",
    ]
    return "\n".join(lines) + "\n"


def _cell(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "-"


def _relative(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.1f}%" if b > 0 and math.isfinite(a) else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weeks", default="41-53", help="stream weeks FIRST-LAST")
    parser.add_argument("--retrain-every", type=int, default=1, help="weeks between retrainings")
    parser.add_argument("--workers", type=int, default=2, help="federations run side by side")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from results_online.json"
    )
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "results_online.json").read_text())
        text = report(saved["online"], saved["retrained"], saved["seconds"])
        atomic_write_bytes(args.out / "results_online.md", text.encode())
        print(text)
        return 0
    first, last = (int(x) for x in args.weeks.split("-"))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedshop-online-bench-") as tmp:
        work = Path(tmp)
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            online = pool.submit(online_run, first, last, work)
            retrains = [
                pool.submit(retrain_week, week, work)
                for week in range(first, last + 1, args.retrain_every)
            ]
            results = [f.result() for f in retrains]
            online_result = online.result()
    seconds = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"online": online_result, "retrained": results, "seconds": seconds}
    atomic_write_bytes(  # the raw figures first: the report can be redone from them
        args.out / "results_online.json", json.dumps(payload, indent=1, default=str).encode()
    )
    text = report(online_result, results, seconds)
    atomic_write_bytes(args.out / "results_online.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
