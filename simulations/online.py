"""``fedshop simulate --online``: offline rounds, then weekly streaming through merchants' inboxes.

Each stream week, in order:
1. every merchant's events of that week are dropped into its inbox (hidden name, then renamed),
   as a shop's export job would;
2. one online step (server/online.py): the merchants score the serving model on the new cohort
   before anything trains on it (prequential), the rollback check, one fine-tuning round on the
   cohort (without the customers each merchant holds out, client/holdout.py), and the gate on
   the held-out customers' events, all through federated evaluation.
The platform side never reads an event: the weekly files are what the merchants' shops would
deliver to their own inboxes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.inbox import ArrivalMode, Inbox
from client.merchant import MerchantConfig
from common.atomic import atomic_write_bytes, atomic_write_json
from common.config import RunConfig
from common.errors import ConfigError, TrainingError
from common.events import MERCHANT_ID, TIMESTAMP, write_events
from common.split import WEEK, with_weeks
from server.online import OnlineSettings, StepResult, platform_keys, run_online
from simulations.provision import CANONICAL, RunLayout, load_events
from simulations.runner import Transport, run_server_app, server_settings
from simulations.watched_grid import watched

log = logging.getLogger(__name__)

HEADLINE = ("ndcg@10", "recall@10", "ndcg@20", "recall@20")  # columns of online.csv


@dataclass(frozen=True)
class StreamSpec:
    """Which weeks stream, how many customers merchants hold out, each merchant's stream budget."""

    first_week: int
    last_week: int
    holdout_share: float = 0.2
    stream_epsilon_cap: float = 1.0
    rounds_per_cohort: int = 1
    min_merchants: int = 2
    gate_tolerance: float = 0.0  # > 0 lets small losses through, and they add up over weeks
    rollback_tolerance: float = 0.02

    def __post_init__(self) -> None:
        if not 1 <= self.first_week <= self.last_week:  # the split bounds them (stream_range)
            raise ConfigError(
                f"stream slices must satisfy 1 <= first <= last, got "
                f"{self.first_week}-{self.last_week}"
            )
        if not 0 < self.holdout_share < 1:
            raise ConfigError(f"holdout share must be in (0, 1), got {self.holdout_share!r}")

    @property
    def weeks(self) -> range:
        return range(self.first_week, self.last_week + 1)

    @classmethod
    def parse(cls, text: str | None, config: RunConfig, **kwargs: Any) -> StreamSpec:
        """``FIRST-LAST`` (default: every week after the training weeks)."""
        if not text:
            return cls(config.data.train_weeks[1] + 1, 53, **kwargs)
        try:
            first, last = (int(part) for part in text.split("-"))
        except ValueError:
            raise ConfigError(f"--online expects weeks as FIRST-LAST, got {text!r}") from None
        if first <= config.data.train_weeks[1]:
            raise ConfigError(
                f"stream week {first} overlaps the offline training weeks {config.data.train_weeks}"
            )
        return cls(first, last, **kwargs)


class WeeklyStream:
    """Every merchant's events with week numbers (the shops' side of the simulation)."""

    def __init__(self, events: pd.DataFrame) -> None:
        self.frames = {
            str(m): with_weeks(g.reset_index(drop=True))
            for m, g in events.groupby(MERCHANT_ID, sort=True)
        }

    def week(self, merchant: str, week: int) -> pd.DataFrame:
        frame = self.frames.get(merchant)
        if frame is None:
            return pd.DataFrame(columns=CANONICAL)
        return frame.loc[frame[WEEK] == week].reset_index(drop=True)


def inbox_root(layout: RunLayout, merchant: str) -> Path:
    return layout.merchants / merchant / "inbox"


def enable_inboxes(layout: RunLayout, spec: StreamSpec) -> dict[str, MerchantConfig]:
    """Give each merchant an inbox, a stream budget and a held-out share in its merchant.toml."""
    configs = {}
    for merchant in layout.merchant_ids():
        base = layout.merchant_config(merchant)
        root = inbox_root(layout, merchant)
        Inbox(root, arrival=ArrivalMode.RENAMED, merchant_id=merchant)  # creates its folders
        streaming = replace(
            base,
            inbox=root,
            inbox_arrival=ArrivalMode.RENAMED,
            stream_epsilon_cap=spec.stream_epsilon_cap,
            holdout_share=spec.holdout_share,
        )
        path = layout.merchants / merchant / "merchant.toml"
        atomic_write_bytes(path, streaming.to_toml().encode())
        configs[merchant] = MerchantConfig.from_toml(path)
    return configs


def drop_file(inbox: Path, name: str, events: pd.DataFrame) -> Path:
    """Write ``events`` under a hidden name and rename it in (the inbox's rename mode)."""
    target = inbox / "inbox" / name
    hidden = target.with_name("." + name)
    write_events(events[CANONICAL].reset_index(drop=True), hidden)
    os.replace(hidden, target)
    return target


def deliver_week(
    layout: RunLayout, stream: WeeklyStream, week: int, merchants: Iterable[str]
) -> int:
    """Each merchant's events of ``week`` into its inbox; returns the number of events."""
    total = 0
    for merchant in merchants:
        events = stream.week(merchant, week)
        if len(events):
            drop_file(inbox_root(layout, merchant), f"week-{week:02d}.parquet", events)
            total += len(events)
    return total


def online_settings_for(layout: RunLayout, spec: StreamSpec) -> OnlineSettings:
    private, public = platform_keys(layout.server / "platform-keys")
    return OnlineSettings(
        registry_dir=layout.server / "registry",
        signing_key=private,
        verify_key=public,
        rounds_per_cohort=spec.rounds_per_cohort,
        min_merchants=spec.min_merchants,
        gate_tolerance=spec.gate_tolerance,
        rollback_tolerance=spec.rollback_tolerance,
        event_log=layout.root / "online-events.jsonl",
    )


def week_row(week: int, result: StepResult) -> dict[str, Any]:
    return {"week": week, **result.to_dict()}


def write_online_results(run_dir: Path, rows: list[dict[str, Any]], summary: Mapping) -> None:
    """``online.json`` (everything) and ``online.csv`` (one line per week)."""
    atomic_write_json(run_dir / "online.json", {"summary": dict(summary), "weeks": rows})
    merchants = sorted({m for row in rows for m in row["epsilon_remaining"]})
    metrics = list(HEADLINE)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "week",
            *metrics,
            "cases",
            "serving_before",
            "candidate",
            "promoted",
            "serving_after",
            "merchants_trained",
            "merchants_refused",
            "merchants_failed",
            *(f"epsilon_remaining:{m}" for m in merchants),
        ]
    )
    for row in rows:
        pre = row["prequential"]
        writer.writerow(
            [
                row["week"],
                *(f"{pre.get(k, math.nan):.5f}" for k in metrics),
                f"{row['prequential_cases']:.0f}",
                row["serving_before"],
                row["candidate"] if row["candidate"] is not None else "",
                int(row["promoted"]),
                row["serving"],
                len(row["trained"]),
                len(row["refused"]),
                len(row["failed"]),
                *(f"{row['epsilon_remaining'].get(m, math.nan):.4f}" for m in merchants),
            ]
        )
    atomic_write_bytes(run_dir / "online.csv", buffer.getvalue().encode())


def online_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    metrics = list(HEADLINE)
    means = {
        f"mean_{k}": float(np.nanmean([r["prequential"].get(k, math.nan) for r in rows]))
        for k in metrics
    }
    return {
        "weeks": len(rows),
        **means,
        "candidates": sum(1 for r in rows if r["candidate"] is not None),
        "promotions": sum(1 for r in rows if r["promoted"]),
        "rollbacks": sum(1 for r in rows if r["rollback"]),
        "final_version": rows[-1]["serving"] if rows else None,
    }


def simulate_online(
    layout: RunLayout,
    spec: StreamSpec,
    *,
    transport: Transport = Transport.FLOWER,
    num_cpus_per_client: float = 1.0,
    merchants_in_week: Callable[[int], Iterable[str]] | None = None,
    verbose: bool = False,
    reference_offline: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Offline rounds and the weekly stream in one federation; returns the summary.
    ``ray_address`` (default: ``simulation.ray_address``) runs it on a running Ray cluster.
    ``reference_offline``: the merchants also score the offline model every week (as it is,
    with refreshed and with stale histories)."""
    settings = server_settings(layout)
    enable_inboxes(layout, spec)
    events = load_events(settings.config)
    slices = layout.time_split().slice_numbers(events[TIMESTAMP])  # weeks unless data.slice_days
    stream = WeeklyStream(events.assign(**{WEEK: slices}))
    weeks = list(spec.weeks)
    result: dict[str, Any] = {}

    def before_step(index: int) -> str:
        week = weeks[index]
        active = merchants_in_week(week) if merchants_in_week else layout.merchant_ids()
        deliver_week(layout, stream, week, active)
        return f"week {week}"

    def main(grid: Any) -> None:
        total = settings.config.federation.rounds + len(weeks)
        with watched(grid, rounds=total) as shown:
            offline, steps = run_online(
                shown,
                settings,
                online_settings_for(layout, spec),
                rounds=len(weeks),
                before_step=before_step,
                reference_offline=reference_offline,
            )
        rows = [week_row(week, step) for week, step in zip(weeks, steps, strict=True)]
        for row in rows:
            log.info(
                "week %d: %s | v%d -> v%d | %d trained, %d refused | %s",
                row["week"],
                " ".join(f"{k} {v:.4f}" for k, v in row["prequential"].items()) or "-",
                row["serving_before"],
                row["serving"],
                len(row["trained"]),
                len(row["refused"]),
                row["reason"],
            )
        summary = {"offline": offline, **online_summary(rows)}
        write_online_results(layout.root, rows, summary)
        result.update(summary)

    run_server_app(
        layout,
        main,
        transport=transport,
        num_cpus_per_client=num_cpus_per_client,
        verbose=verbose,
        ray_address=settings.config.simulation.ray_address if ray_address is None else ray_address,
    )
    if not result:
        raise TrainingError(f"the online simulation ended without results in {layout.root}")
    return result
