"""Freshness of online fine-tuning on a loopback deployment.

The real processes over TLS (``fedshop server --online`` and one ``fedshop client`` per
merchant), Complete Journey's busiest stores as merchants. After the offline round(s) on
weeks 1-40, each stream week's events are renamed into every merchant's inbox at once; the
figure is the time from that rename to the registry's record of the promotion of the first
version the merchant trained on the file. Writes docs/freshness.md.

Usage: python benchmarks/freshness.py [--merchants 3] [--weeks 3] [--interval 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import deploy_harness as h  # noqa: E402
from machine_load import reference_work_seconds  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merchants", type=int, default=3)
    parser.add_argument("--weeks", type=int, default=3)
    parser.add_argument("--interval", type=float, default=5.0, help="online.interval_s")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "freshness.md")
    args = parser.parse_args()

    from common.config import RunConfig
    from simulations.online import WeeklyStream, drop_file
    from simulations.provision import load_events

    root = Path(tempfile.mkdtemp(prefix="fedshop-freshness-"))
    config_dict = {
        "data": {"source": "completejourney", "top_n": args.merchants},
        "federation": {"rounds": 1, "min_merchants": args.merchants},
    }
    began = time.perf_counter()
    fed = h.provision_deployment(root, config_dict)
    h.enable_inboxes(fed)
    config = RunConfig.from_dict(config_dict)
    stream = WeeklyStream(load_events(config))
    online = h.write_online_toml(
        root / "online.toml",
        keys_dir=root / "platform",
        interval_s=args.interval,
        max_rounds=0,
        min_merchants=2,
        gate_tolerance=1.0,  # every candidate passes: the figure is the path's latency
        monitoring_port=-1,
    )
    server, clients, registry = h.start_online(
        fed, online, verify_key=root / "platform" / "platform.pub", timeout=1800
    )
    offline_s = time.perf_counter() - began
    arrivals: list[list[h.Arrival]] = []
    try:
        for week in range(41, 41 + args.weeks):
            after = h.latest_round(registry)
            dropped = {}
            for name in fed.merchants:
                events = stream.week(name, week)
                if len(events):
                    drop_file(fed.layout.merchants / name / "inbox", f"week-{week}.parquet", events)
                    dropped[name] = time.time()
            found = h.wait_for_arrivals(registry, dropped, after_round=after, timeout=900)
            arrivals.append(found)
            print(f"week {week}: " + ", ".join(f"{a.merchant} {a.seconds:.1f} s" for a in found))
    finally:
        for proc in [server, *clients]:
            h.stop(proc)
    seconds = [a.seconds for week in arrivals for a in week]
    rows = "\n".join(
        f"| {41 + i} | {a.merchant} | {a.round} | {a.version} | {a.seconds:.1f} |"
        for i, week in enumerate(arrivals)
        for a in week
    )
    reference_ms = reference_work_seconds() * 1000
    text = f"""# Freshness of online fine-tuning (loopback deployment)

Measured by `python benchmarks/freshness.py --merchants {args.merchants} --weeks {args.weeks}
--interval {args.interval:g}`: `fedshop server --online` and {args.merchants} `fedshop client`
processes on one machine over TLS with node authentication, the {args.merchants} busiest
Complete Journey stores as merchants, one offline DP round on weeks 1-40
({offline_s:.0f} s from provisioning to the offline model in the registry). Then each stream
week's events (less the held-out customers) are renamed into every merchant's inbox at once.
Freshness is the time from that rename to the registry's record of the promotion of the first
version the merchant trained on the file; the gate is set to pass every candidate here, so the
figure is the latency of the path (inbox scan, DP training, aggregation, gate evaluation,
registration, promotion), not of the gate's verdict. Machine: {platform.machine()}, {os.cpu_count()}
cores, Python {platform.python_version()}; online round interval {args.interval:g} s; a fixed
piece of interpreter work took {reference_ms:.0f} ms at the end (`benchmarks/machine_load.py`,
how fast the cores were).

| week | merchant | round | version | seconds to promotion |
|---|---|---|---|---|
{rows}

- Median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s over {len(seconds)} files
  (target <= 120 s).
- A round costs the messages to and from each merchant's long-running ClientApp runner
  (docs/transport.md), DP training on the cohort and gating on the validation archive; a file
  that lands just after a round's inbox scan waits for the next round (at most `interval_s`
  plus one round).
"""
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
