"""Scale: 10, 100 and 1,000 synthetic merchants, 2 rounds each, through Flower's simulation engine.

For each federation size, three child processes (so that one size's memory cannot colour the
next): provisioning; the run, where the platform is this process (the ServerApp's round loop,
acceptance, ledger and streamed aggregation, and Flower's simulation engine with its in-memory
message store) and the merchants' ClientApps are Ray actor processes; and an audit of every
ledger. Measured:

- wall time per merchant-round: the training rounds' seconds / (merchants x rounds);
- platform peak memory: the peak resident set (VmHWM) of the platform process during the run,
  reset when the ServerApp starts (``/proc/self/clear_refs``), so start-up and provisioning are
  not in it; Ray's actors, raylet and GCS are other processes and are not counted (they are the
  merchants and the transport); also the growth of that peak over the resident set at the
  ServerApp's start;
- bytes sent and received per merchant per training round: each message's Flower protobuf
  size (what a deployment puts on the wire before TLS), counted at the platform's grid;
- ledger time: the platform's acceptance of each reply (signature, chain, epsilon recomputed
  from the merchant's history, append to the server ledger), per merchant-round;
- audit time: ``fedshop audit verify`` and budgets in process over every merchant ledger and
  the server ledger.

The model is the production next-basket scorer, kept small for these runs (2,048 product
buckets, 8-dimensional embeddings, 2,000 synthetic events per merchant, one local epoch);
evaluation runs once, as the final test, not every round. The first round includes starting
the Ray actors (importing torch and Opacus in each), a fixed cost, so the time per
merchant-round is reported over all rounds and over the warm rounds (after the first).
Writes docs/scale.json, docs/scale.png and docs/scale.md.
Usage: python benchmarks/scale.py [--merchants 10,100,1000] [--rounds 2] [--work DIR]
[--update-dtype float32|float16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOCS = ROOT / "docs"
SCALE_OVERRIDES = [
    "data.source=synthetic",
    "data.synthetic_events_per_merchant=2000",
    "training.local_epochs=1",
    "model.product_buckets=2048",
    "model.category_buckets=64",
    "model.embedding_dim=8",
    "model.hidden_dim=16",
    "federation.min_merchants=2",
    "federation.round_timeout_s=14400",  # 1,000 merchants on 2 cores: no one times out
    "evaluation.every_round=false",
]
TARGET_RATIO = 1.5


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


# -- child: provision ------------------------------------------------------------------
def provision_child(
    merchants: int, rounds: int, out: Path, extra: list[str] | None = None
) -> dict[str, Any]:
    from common.config import RunConfig
    from common.configparse import apply_overrides
    from simulations.provision import provision

    began = time.perf_counter()
    overrides = [*SCALE_OVERRIDES, f"data.top_n={merchants}", f"federation.rounds={rounds}"]
    overrides += extra or []
    layout = provision(RunConfig.from_dict(apply_overrides({}, overrides)), out)
    return {"merchants": len(layout.merchant_ids()), "seconds": time.perf_counter() - began}


# -- child: the run --------------------------------------------------------------------
class CountingGrid:
    """A Grid that counts the protobuf bytes of what the platform sends and receives, per
    message type (the first part of it: ``train``, ``evaluate``)."""

    def __init__(self, inner: Any) -> None:
        from flwr.common.serde import message_to_proto

        self._inner = inner
        self._size = lambda message: message_to_proto(message).ByteSize()
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.messages: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def push_messages(self, messages: Any) -> Any:
        batch = list(messages)
        ids = self._inner.push_messages(batch)
        for message in batch:
            kind = message.metadata.message_type.split(".")[0]
            self.sent[kind] = self.sent.get(kind, 0) + self._size(message)
            self.messages[kind] = self.messages.get(kind, 0) + 1
        return ids

    def pull_messages(self, message_ids: Any) -> Any:
        replies = list(self._inner.pull_messages(message_ids))
        for reply in replies:
            kind = reply.metadata.message_type.split(".")[0]
            self.received[kind] = self.received.get(kind, 0) + self._size(reply)
        return replies


def run_child(run_dir: Path) -> dict[str, Any]:
    from flwr.serverapp import Grid

    import server.federation as federation_module
    from server.platform import run_platform
    from simulations.console import configure_output
    from simulations.provision import RunLayout
    from simulations.runner import Transport, run_server_app, server_settings

    configure_output(verbose=False)
    layout = RunLayout(run_dir)
    settings = server_settings(layout)
    figures: dict[str, Any] = {}
    acceptance = {"seconds": 0.0, "replies": 0}
    decide = federation_module.decide

    def timed_decide(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return decide(*args, **kwargs)
        finally:
            acceptance["seconds"] += time.perf_counter() - began
            acceptance["replies"] += 1

    federation_module.decide = timed_decide  # type: ignore[assignment]

    def main(grid: Grid) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current resident set
        figures["rss_at_start_mib"] = _status_kib("VmRSS") / 1024
        counting = CountingGrid(grid)
        began = time.perf_counter()
        result = run_platform(counting, settings)  # type: ignore[arg-type]
        figures["platform_seconds"] = time.perf_counter() - began
        figures["peak_rss_mib"] = _status_kib("VmHWM") / 1024
        figures["history"] = [
            {"round": row["round"], "seconds": row["seconds"], "trained": len(row["trained"])}
            for row in result.history
        ]
        figures["completed"] = result.completed
        figures["bytes_sent"], figures["bytes_received"] = counting.sent, counting.received
        figures["messages"] = counting.messages

    began = time.perf_counter()
    run_server_app(layout, main, transport=Transport.FLOWER)
    figures["wall_seconds"] = time.perf_counter() - began
    figures["acceptance"] = acceptance
    return figures


# -- child: audit ----------------------------------------------------------------------
def audit_child(run_dir: Path) -> dict[str, Any]:
    from common.audit.budgets import budget_rows
    from common.audit.verify import audit_ledgers
    from simulations.provision import RunLayout

    layout = RunLayout(run_dir)
    ledgers = [layout.merchant_config(m).ledger_path for m in layout.merchant_ids()]
    began = time.perf_counter()
    result = audit_ledgers(
        ledgers, keys_dir=layout.keys, server_ledger=layout.server / "ledger.sqlite"
    )
    result.raise_if_bad()
    rows = budget_rows(result.chains)
    return {"seconds": time.perf_counter() - began, "entries": result.entries, "rows": len(rows)}


# -- parent ----------------------------------------------------------------------------
def _child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, __file__, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def measure(
    merchants: int, rounds: int, work: Path, *, update_dtype: str = "float32"
) -> dict[str, Any]:
    """One federation size, end to end; replies carry their weights as ``update_dtype``."""
    run_dir = work / f"m{merchants}-{update_dtype}"
    shutil.rmtree(run_dir, ignore_errors=True)
    load_before = os.getloadavg()[0]
    others = other_jobs()
    from machine_load import reference_work_seconds

    reference_ms = 1000 * reference_work_seconds()
    print(f"== {merchants} merchants ({update_dtype} updates): provisioning", flush=True)
    dtype = f"federation.update_dtype={update_dtype}"
    provisioned = _child("provision", str(merchants), str(rounds), str(run_dir), dtype)
    print(f"== {merchants} merchants: run ({provisioned['seconds']:.0f}s provisioning)", flush=True)
    ran = _child("run", str(run_dir))
    audited = _child("audit", str(run_dir))
    n = int(provisioned["merchants"])
    train_rounds = list(ran["history"])
    merchant_rounds = sum(row["trained"] for row in train_rounds) or 1
    figures = {
        "merchants": n,
        "update_dtype": update_dtype,
        "rounds": len(train_rounds),
        "completed": ran["completed"],
        "provision_seconds": provisioned["seconds"],
        "wall_seconds": ran["wall_seconds"],
        "round_seconds": [row["seconds"] for row in train_rounds],
        "seconds_per_merchant_round": sum(row["seconds"] for row in train_rounds)
        / (n * len(train_rounds)),
        "warm_seconds_per_merchant_round": sum(row["seconds"] for row in train_rounds[1:])
        / (n * max(1, len(train_rounds) - 1)),
        "trained_per_round": [row["trained"] for row in train_rounds],
        "peak_rss_mib": ran["peak_rss_mib"],
        "rss_at_start_mib": ran["rss_at_start_mib"],
        "peak_growth_mib": ran["peak_rss_mib"] - ran["rss_at_start_mib"],
        "sent_bytes_per_merchant_round": ran["bytes_sent"].get("train", 0) / merchant_rounds,
        "received_bytes_per_merchant_round": ran["bytes_received"].get("train", 0)
        / merchant_rounds,
        "evaluation_sent_bytes_per_merchant": ran["bytes_sent"].get("evaluate", 0) / n,
        "evaluation_received_bytes_per_merchant": ran["bytes_received"].get("evaluate", 0) / n,
        "ledger_ms_per_merchant_round": 1000 * ran["acceptance"]["seconds"] / merchant_rounds,
        "audit_seconds": audited["seconds"],
        "audit_ms_per_entry": 1000 * audited["seconds"] / max(1, audited["entries"]),
        "ledger_entries": audited["entries"],
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "other_jobs": others,
        "reference_work_ms": reference_ms,
    }
    print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, list)}), flush=True)
    return figures


def with_load(row: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """A row measured before loads were kept per size: the load of its whole run instead."""
    if "load_average_1min" in row:
        return row
    first = [float(context[k].split()[0]) for k in ("load_before", "load_after")]
    other = str(context.get("other_jobs", "")).removeprefix(
        "Other work on the machine when the run started: "
    )
    kept = "; ".join(line for line in other.rstrip(".").splitlines() if "scale.py" not in line)
    return {**row, "load_average_1min": first, "other_jobs": kept}


def other_jobs() -> str:
    """The other processes busy on the machine as a size starts (benchmarks/machine_load.py)."""
    from machine_load import busy_processes

    return busy_processes()


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["merchants"] for r in rows]
    panels = [
        (
            "wall time per merchant-round (s)",
            [
                ("all rounds", "seconds_per_merchant_round"),
                ("warm rounds", "warm_seconds_per_merchant_round"),
            ],
        ),
        (
            "platform peak memory (MiB)",
            [("peak RSS", "peak_rss_mib"), ("growth over start", "peak_growth_mib")],
        ),
        (
            "bytes per merchant per round (KiB)",
            [
                ("sent", "sent_bytes_per_merchant_round"),
                ("received", "received_bytes_per_merchant_round"),
            ],
        ),
        (
            "ledger and audit time (ms)",
            [
                ("acceptance per merchant-round", "ledger_ms_per_merchant_round"),
                ("audit per ledger entry", "audit_ms_per_entry"),
            ],
        ),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, series) in zip(axes, panels, strict=True):
        for label, key in series:
            scale = 1 / 1024 if "bytes" in key else 1.0
            ax.plot(n, [r[key] * scale for r in rows], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("merchants")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    first, last = rows[0], rows[-1]

    def spread(key: str) -> float:  # largest over smallest, over every size
        values = [r[key] for r in rows]
        return max(values) / min(values)

    warm = "warm_seconds_per_merchant_round"
    memory_ratio = spread("peak_rss_mib")
    time_ratio, warm_ratio = spread("seconds_per_merchant_round"), spread(warm)
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [
        "# Scale: the platform against the number of merchants",
        "",
        "`python benchmarks/scale.py` (part of `make bench`) runs synthetic federations of "
        f"{', '.join(str(r['merchants']) for r in rows)} merchants, {first['rounds']} rounds "
        "each, in one run, through Flower's simulation engine (Ray actors for the merchants' "
        "ClientApps, the platform's ServerApp in the benchmark's process). How each figure is "
        "taken is in the module docstring of benchmarks/scale.py; in short: the platform's "
        "memory is the peak resident set of the platform process during the run (the ServerApp "
        "and Flower's engine with its message store; the merchants' Ray actors are other "
        "processes and not counted), bytes are Flower protobuf sizes counted at the platform's "
        "grid.",
        "",
        "The model is the production next-basket scorer kept small for these runs (2,048 product "
        "buckets, 64 category buckets, 8-dimensional embeddings, hidden size 16; 2,000 synthetic "
        "events per merchant, one local epoch); DP-SGD is on (noise calibrated by each merchant "
        "to its cap); evaluation runs once at the end (the final test), not every round. The "
        "first round includes starting Flower's engine and the Ray actors (each imports torch "
        "and Opacus): a fixed cost that the per merchant-round time of all rounds includes and "
        "the warm figure (rounds after the first) leaves out. Merchants' replies carry their "
        f"weights as {' / '.join(sorted({r.get('update_dtype', 'float32') for r in rows}))} "
        "(`federation.update_dtype`; float16 is compared below).",
        "",
        "![scale](scale.png)",
        "",
        "What keeps the platform's memory independent of the number of merchants: each "
        "reply passes the acceptance checks (server/acceptance.py) and its update is folded "
        "at once into one exact running weighted sum (`RunningSum`, server/strategies.py: "
        "fixed-point integer digits, so the mean does not depend on arrival order), then "
        "dropped; instructions are built lazily, and a simulation keeps at most 32 messages "
        "in flight (Flower's engine stores pushed messages in the platform's process); "
        "evaluation replies are folded into metric sums the same way.",
        "",
        "| merchants | s per merchant-round (warm) | round seconds | platform peak MiB "
        "| growth over start MiB | sent KiB / merchant-round | received KiB / merchant-round "
        "| acceptance ms / merchant-round | audit s (entries) | run wall s | provisioning s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['merchants']} | {r['seconds_per_merchant_round']:.3f} ({r[warm]:.3f}) | "
            f"{' / '.join(f'{s:.0f}' for s in r['round_seconds'])} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_growth_mib']:.0f} | {r['sent_bytes_per_merchant_round'] / 1024:.1f} | "
            f"{r['received_bytes_per_merchant_round'] / 1024:.1f} | "
            f"{r['ledger_ms_per_merchant_round']:.1f} | "
            f"{r['audit_seconds']:.2f} ({r['ledger_entries']}) | "
            f"{r['wall_seconds']:.0f} | {r['provision_seconds']:.0f} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        f"- Platform peak memory within {TARGET_RATIO}x from {first['merchants']} to "
        f"{last['merchants']} merchants: {first['peak_rss_mib']:.0f} MiB -> "
        f"{last['peak_rss_mib']:.0f} MiB, largest / smallest {memory_ratio:.2f}x: "
        f"**{verdict(memory_ratio <= TARGET_RATIO)}**.",
        f"- Time per merchant-round flat within {TARGET_RATIO}x: "
        f"{first['seconds_per_merchant_round']:.3f} s -> "
        f"{last['seconds_per_merchant_round']:.3f} s, "
        f"largest / smallest {time_ratio:.2f}x: **{verdict(time_ratio <= TARGET_RATIO)}**; "
        "warm rounds only: "
        f"{first[warm]:.3f} s -> {last[warm]:.3f} s, {warm_ratio:.2f}x: "
        f"**{verdict(warm_ratio <= TARGET_RATIO)}**.",
        "- The one-off start-up in round 1 (round 1 minus round 2, the same work otherwise): "
        + " / ".join(
            f"{r['round_seconds'][0] - r['round_seconds'][1]:.1f} s"
            for r in rows
            if len(r["round_seconds"]) > 1
        )
        + " at "
        + " / ".join(str(r["merchants"]) for r in rows if len(r["round_seconds"]) > 1)
        + " merchants: a cost per run, not per merchant-round, which weighs most on the "
        "smallest run.",
        *(["", context["note"]] if context.get("note") else []),
        "",
        "## Machine",
        "",
        f"{context['machine']}. The machine is shared: 1-minute load average before and after "
        "each size, and the other processes busy (at least 20% of a core) as it started:",
        "",
        *(
            f"- {r['merchants']} merchants: load {r['load_average_1min'][0]:.1f} -> "
            f"{r['load_average_1min'][1]:.1f}; {r['other_jobs'] or 'no other busy process'}"
            + (
                f"; a fixed piece of interpreter work took {r['reference_work_ms']:.0f} ms "
                "(benchmarks/machine_load.py: how fast the cores were)"
                if "reference_work_ms" in r
                else ""
            )
            for r in rows
        ),
        "",
        "Figures: docs/scale.json.",
        "",
        *update_size_section(),
    ]
    return "\n".join(lines)


def update_size_section() -> list[str]:
    """The float32 / float16 comparison of benchmarks/update_dtype.py, if it was run."""
    from update_dtype import RESULTS, section

    return section(json.loads(RESULTS.read_text())) if RESULTS.exists() else []


def main() -> int:
    from common.flower_env import quiet_flower_environment

    quiet_flower_environment()  # inherited by the children, Flower's engine and Ray's actors
    if len(sys.argv) > 1 and sys.argv[1] in ("provision", "run", "audit"):
        command, *rest = sys.argv[1:]
        if command == "provision":
            result = provision_child(int(rest[0]), int(rest[1]), Path(rest[2]), rest[3:])
        elif command == "run":
            result = run_child(Path(rest[0]))
        else:
            result = audit_child(Path(rest[0]))
        print(json.dumps(result), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merchants", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, help="run directories (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument(
        "--add",
        action="store_true",
        help="add these sizes to the rows already in docs/scale.json (a size measured again "
        "replaces its row) instead of starting afresh",
    )
    parser.add_argument("--note", default="", help="a sentence to print under the targets")
    parser.add_argument(
        "--update-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="how merchants' replies carry their weights (federation.update_dtype)",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedshop-scale-"))
    rows: list[dict[str, Any]] = []
    if args.add and (DOCS / "scale.json").exists():
        earlier = json.loads((DOCS / "scale.json").read_text())
        rows = [with_load(row, earlier["context"]) for row in earlier["rows"]]
    try:
        for merchants in (int(m) for m in args.merchants.split(",")):
            rows = [r for r in rows if r["merchants"] != merchants]
            rows.append(measure(merchants, args.rounds, work, update_dtype=args.update_dtype))
            rows.sort(key=lambda r: int(r["merchants"]))
            write_docs(rows, args.note)  # each size as soon as it is measured
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {DOCS / 'scale.md'}", flush=True)
    return 0


def write_docs(rows: list[dict[str, Any]], note: str = "") -> None:
    context = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "note": note,
    }
    DOCS.mkdir(exist_ok=True)
    (DOCS / "scale.json").write_text(
        json.dumps({"context": context, "rows": rows}, indent=1) + "\n"
    )
    plot(rows, DOCS / "scale.png")
    (DOCS / "scale.md").write_text(report(rows, context))


if __name__ == "__main__":
    raise SystemExit(main())
