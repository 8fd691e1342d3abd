"""``fedshop simulate --online``: offline rounds, then weekly streaming through merchants' inboxes.

Each stream week, in order:
1. prequential evaluation: the PROMOTED model is scored on all of that week's events (before
   anything is trained on them);
2. a fixed, seeded share of customers is held out (the same customers every week): their
   events never reach an inbox and become the platform's held-out recent data for the gate and
   the rollback check;
3. the other events are dropped into each merchant's inbox (hidden name, then renamed);
4. one fine-tuning round (``train.finetune``); the candidate is registered and gated.

Evaluation here reads raw events on the platform side: that is a simulation device only (in
deployment the platform only sees the validation archive it was given).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.finetune import run_finetune_round
from client.inbox import ArrivalMode, Inbox
from client.merchant import MerchantConfig
from client.merchant_round import TrainRequest
from common.config import RunConfig
from common.errors import ConfigError, FedshopError
from common.events import CUSTOMER_ID, MERCHANT_ID, TIMESTAMP, write_events
from common.features import build_catalog, encode_events, evaluation_records, stable_hash
from common.keys import load_verify_key
from common.ledger import ExpectedRelease, ServerLedger
from common.model import arrays_sha256
from common.protocol import Outcome
from common.rng import numpy_stream
from common.split import WEEK, with_weeks
from server.checkpoint import atomic_write_bytes
from server.evaluation_set import EvaluationSet
from server.federation import RoundOutcome
from server.online import OnlineLoop, OnlineSettings, platform_keys, remaining_from_ledger
from server.strategies import MerchantUpdate
from simulations.provision import CANONICAL, RunLayout, load_events

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class StreamSpec:
    """Which weeks stream, how many customers are held out, each merchant's stream budget."""

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


def held_out(customers: pd.Series, *, share: float, seed: int) -> np.ndarray:
    """True for the fixed, seeded share of customers kept from the inboxes (same every week)."""
    buckets = 1_000_000
    keyed = customers.astype(str).radd(f"{seed}:holdout:")
    return (stable_hash(keyed, buckets) - 1) < share * (buckets - 1)


class WeeklyStream:
    """Every merchant's events with week numbers; evaluation sets per week."""

    def __init__(self, events: pd.DataFrame, config: RunConfig, spec: StreamSpec) -> None:
        self.config = config
        self.spec = spec
        self.frames = {
            str(m): with_weeks(g.reset_index(drop=True))
            for m, g in events.groupby(MERCHANT_ID, sort=True)
        }

    def week(self, merchant: str, week: int) -> pd.DataFrame:
        frame = self.frames.get(merchant)
        if frame is None:
            return pd.DataFrame(columns=CANONICAL)
        return frame.loc[frame[WEEK] == week].reset_index(drop=True)

    def before(self, merchant: str, week: int) -> pd.DataFrame:
        frame = self.frames[merchant]
        return frame.loc[frame[WEEK] < week].reset_index(drop=True)

    def split(self, merchant: str, week: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(events for the inbox, held-out events) of ``merchant`` in ``week``."""
        events = self.week(merchant, week)
        mask = held_out(events[CUSTOMER_ID], share=self.spec.holdout_share, seed=self.config.seed)
        return events.loc[~mask].reset_index(drop=True), events.loc[mask].reset_index(drop=True)

    def evaluation(self, merchants: Iterable[str], week: int, *, part: str) -> EvaluationSet | None:
        """Cases from ``week`` (``part`` = "all" or "held-out"); histories use earlier weeks."""
        items = []
        for merchant in sorted(merchants):
            events = self.week(merchant, week) if part == "all" else self.split(merchant, week)[1]
            if len(events) == 0 or merchant not in self.frames:
                continue
            prior = self.before(merchant, week)
            spec = self.config.model
            catalog = build_catalog(pd.concat([prior, events], ignore_index=True), spec)
            encoded = encode_events(events, spec, context=prior if len(prior) else None)
            records = evaluation_records(
                encoded,
                catalog,
                candidates=self.config.evaluation.candidates,
                max_cases=self.config.evaluation.max_cases_per_merchant,
                rng=numpy_stream(self.config.seed, "online-eval", merchant, week, part),
            )
            items.append((merchant, records))
        return EvaluationSet.concatenate(items) if items else None


def inbox_root(layout: RunLayout, merchant: str) -> Path:
    return layout.merchants / merchant / "inbox"


def enable_inboxes(layout: RunLayout, spec: StreamSpec) -> dict[str, MerchantConfig]:
    """Give each merchant an inbox and a stream budget in its ``merchant.toml``."""
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


class InProcessRunner:
    """Fine-tuning rounds without Flower: the same merchant code and server-side ledger checks.

    Used by the benchmark (and tests) where Ray's start-up would dominate; ``active`` limits
    the merchants that are asked (a merchant that has not joined yet is not asked at all).
    """

    def __init__(
        self,
        layout: RunLayout,
        config: RunConfig,
        *,
        run_id: str,
        rounds_per_cohort: int,
        active: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.layout = layout
        self.config = config
        self.run_id = run_id
        self.rounds_per_cohort = rounds_per_cohort
        self.active = active or layout.merchant_ids
        self.ledger_path = layout.server / "ledger.sqlite"

    def run(self, arrays: Arrays, rnd: int) -> RoundOutcome:
        request = TrainRequest(
            run_id=self.run_id,
            round=rnd,
            planned_rounds=self.rounds_per_cohort,
            seed=self.config.seed,
            model_in_sha256=arrays_sha256(arrays),
            config=self.config,
            arrays=arrays,
        )
        outcome = RoundOutcome()
        with ServerLedger.open(self.ledger_path) as ledger:
            for merchant in sorted(self.active()):
                reply = run_finetune_round(request, self.layout.merchant_config(merchant))
                self._accept(reply, request, ledger, outcome)
        return outcome

    def _accept(
        self, reply: Any, request: TrainRequest, ledger: ServerLedger, outcome: RoundOutcome
    ) -> None:
        if reply.outcome is not Outcome.TRAINED or reply.arrays is None:
            target = outcome.refused if reply.outcome is Outcome.REFUSED else outcome.failed
            target[reply.merchant_id] = reply.reason
            return
        merchant = reply.merchant_id
        if self.config.privacy.enabled:
            try:
                entry = ledger.accept(
                    reply.ledger_entry,
                    verify_key=load_verify_key(self.layout.keys / f"{merchant}.pub"),
                    expected=ExpectedRelease(
                        run_id=self.run_id,
                        round=request.round,
                        model_in_sha256=request.model_in_sha256,
                        clipping_norm=self.config.privacy.clipping_norm,
                        max_delta=self.config.privacy.delta,
                        max_epsilon=self.config.privacy.epsilon_cap,
                        min_noise_multiplier=self.config.privacy.noise_multiplier or 0.0,
                    ),
                    model_out_sha256=arrays_sha256(reply.arrays),
                    merchant_id=merchant,
                )
            except FedshopError as exc:
                outcome.failed[merchant] = f"update rejected: {exc.one_line()}"
                return
            outcome.epsilon[merchant] = entry.release.epsilon_after
        examples = int(reply.metrics.get("num-examples", 1))
        outcome.losses[merchant] = float(reply.metrics.get("train-loss", math.nan))
        outcome.updates.append(MerchantUpdate(merchant, reply.arrays, examples))

    def epsilon_remaining(self) -> dict[str, float]:
        with ServerLedger.open(self.ledger_path) as ledger:
            return remaining_from_ledger(ledger)


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


def drive_weeks(
    loop: OnlineLoop,
    stream: WeeklyStream,
    layout: RunLayout,
    *,
    first_round: int,
    merchants: Callable[[int], Iterable[str]] | None = None,
) -> list[dict[str, Any]]:
    """The weekly prequential loop (see the module docstring); one row per week."""
    spec = stream.spec
    rows = []
    for week in range(spec.first_week, spec.last_week + 1):
        began = time.perf_counter()
        active = sorted(merchants(week) if merchants else layout.merchant_ids())
        serving, arrays = loop.serving()
        everything = stream.evaluation(active, week, part="all")
        prequential = loop.evaluate(arrays, everything) if everything is not None else {}
        recent = stream.evaluation(active, week, part="held-out")
        rollback = loop.check_rollback(recent)
        for merchant in active:
            for_inbox, _ = stream.split(merchant, week)
            if len(for_inbox):
                drop_file(inbox_root(layout, merchant), f"week-{week:02d}.parquet", for_inbox)
        result = loop.step(recent, first_round=first_round, trigger=f"week {week}")
        rows.append(
            {
                "week": week,
                "serving_before": serving.id,
                "prequential": prequential,
                "rollback": rollback,
                **result.to_dict(),
                "week_seconds": time.perf_counter() - began,
            }
        )
        log.info(
            "week %d: NDCG@10 %.4f AUC %.4f | v%d -> v%d | %d trained, %d refused | %s",
            week,
            prequential.get("ndcg@10", math.nan),
            prequential.get("auc", math.nan),
            serving.id,
            result.serving,
            len(result.trained),
            len(result.refused),
            result.reason,
        )
    return rows


def write_online_results(run_dir: Path, rows: list[dict[str, Any]], summary: Mapping) -> None:
    """``online.json`` (everything) and ``online.csv`` (one line per week)."""
    atomic_write_bytes(
        run_dir / "online.json",
        json.dumps({"summary": dict(summary), "weeks": rows}, indent=1, default=str).encode(),
    )
    merchants = sorted({m for row in rows for m in row["epsilon_remaining"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "week",
            "ndcg@10",
            "auc",
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
                f"{pre.get('ndcg@10', math.nan):.5f}",
                f"{pre.get('auc', math.nan):.5f}",
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
    ndcg = [r["prequential"].get("ndcg@10", math.nan) for r in rows]
    auc = [r["prequential"].get("auc", math.nan) for r in rows]
    return {
        "weeks": len(rows),
        "mean_ndcg@10": float(np.nanmean(ndcg)) if rows else math.nan,
        "mean_auc": float(np.nanmean(auc)) if rows else math.nan,
        "candidates": sum(1 for r in rows if r["candidate"] is not None),
        "promotions": sum(1 for r in rows if r["promoted"]),
        "rollbacks": sum(1 for r in rows if r["rollback"]),
        "final_version": rows[-1]["serving"] if rows else None,
    }


def simulate_online(
    layout: RunLayout, spec: StreamSpec, *, num_cpus_per_client: float = 1.0, verbose: bool = False
) -> dict:
    """Offline rounds and the weekly stream in one Flower simulation; returns the summary."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from common.arrays_io import npz_to_arrays
    from server.app import run_platform
    from server.online import FederationRunner
    from simulations.console import quiet_flower
    from simulations.runner import backend_config, server_settings

    settings = server_settings(layout)
    config = settings.config
    enable_inboxes(layout, spec)
    events = load_events(config)
    slices = layout.time_split().slice_numbers(events[TIMESTAMP])  # weeks unless data.slice_days
    stream = WeeklyStream(events.assign(**{WEEK: slices}), config, spec)
    result: dict[str, Any] = {}

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        offline = run_platform(grid, settings)
        online = online_settings_for(layout, spec)
        loop = OnlineLoop(
            config=config,
            settings=online,
            runner=FederationRunner(grid, settings, rounds_per_cohort=spec.rounds_per_cohort),
        )
        arrays = npz_to_arrays((layout.root / "model" / "final.npz").read_bytes())
        loop.bootstrap(arrays, round=config.federation.rounds, metrics=offline.get("test", {}))
        rows = drive_weeks(loop, stream, layout, first_round=config.federation.rounds + 1)
        summary = {"offline": offline, **online_summary(rows)}
        write_online_results(layout.root, rows, summary)
        result.update(summary)

    quiet_flower(verbose=verbose)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(layout.merchant_ids()),
        backend_config=backend_config(num_cpus_per_client=num_cpus_per_client, verbose=verbose),
    )
    if not result:
        raise FedshopError(f"the online simulation ended without results in {layout.root}")
    return result
