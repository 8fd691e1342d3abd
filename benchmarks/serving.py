"""Serving latency and throughput at a merchant: ``fedshop serve`` under a bounded open-loop load.

One Complete Journey store (by default the busiest-catalogue store of the top 10) is the
merchant; its weeks 1-40 are its events (histories and catalogue). The model is the next-basket
scorer: the federated model of a run directory (``--model-run``, e.g. ``runs/default`` after
``make run``) or, without one, the same scorer trained on the store's own weeks 1-40
(non-private, 2 epochs) with the store's local part fitted on weeks 41-45. Versions reach the
merchant's mirror through the publish handler, as in a deployment.

Phases, each at ``--rate`` requests/s for ``--seconds`` s on loopback (a fixed number of requests
sent on a fixed schedule over 16 keep-alive connections by an event loop in its own process;
latency counts from the scheduled send time, so a slow server cannot hide queueing):

1. steady: top-10 for the store's households (10% unknown customer ids: cold start);
2. hot swap: the same, while new versions are published at 1/4, 2/4 and 3/4 of the phase
   (promotion, rollback, promotion).

Then the batch path: ``fedshop recommend --customers FILE`` for 2,000 customer ids.
Writes the measured section of docs/serving.md. Usage:

    python benchmarks/serving.py [--store store-367] [--rate 100] [--seconds 60] [--model-run DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
FEDSHOP = [sys.executable, "-m", "simulations.cli"]


@dataclass
class Sample:
    due: float
    sent: float
    done: float
    status: int
    version: int | None


def open_loop(port: int, paths: list[str], *, rate: float, seconds: float) -> list[Sample]:
    """Send ``rate * seconds`` requests on schedule; stops by itself (count and deadline).

    The generator runs in its own process, one event loop over :data:`CONNECTIONS` keep-alive
    connections: it needs little CPU of the 2 cores it shares with the service, and a late
    response is not late because the generator's own threads were waiting for its GIL."""
    receiving, sending = multiprocessing.get_context("fork").Pipe(duplex=False)

    def child() -> None:
        # The fork inherits the benchmark's heap (events, model, torch); a full collection in
        # the generator walked it for about 0.4 s once per phase, and every response that
        # arrived meanwhile counted as late. Moved out of the collector, it is never walked.
        gc.freeze()
        sending.send(asyncio.run(_open_loop(port, paths, rate=rate, seconds=seconds)))
        sending.close()

    generator = multiprocessing.get_context("fork").Process(target=child)
    generator.start()
    sending.close()
    samples: list[Sample] = receiving.recv()
    generator.join(timeout=60)
    return samples


CONNECTIONS = 16


async def _open_loop(port: int, paths: list[str], *, rate: float, seconds: float) -> list[Sample]:
    total = int(rate * seconds)
    samples: list[Sample | None] = [None] * total
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    async def request(i: int, due: float) -> None:
        reader, writer = await idle.get()  # all busy: it waits, and the wait counts
        sent = time.perf_counter()
        try:
            writer.write(f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            version = json.loads(body).get("model_version") if status == 200 else None
            samples[i] = Sample(due, sent, time.perf_counter(), status, version)
            idle.put_nowait((reader, writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            samples[i] = Sample(due, sent, time.perf_counter(), -1, None)
            writer.close()
            idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    start = time.perf_counter() + 0.2
    tasks = []
    for i in range(total):
        due = start + i / rate
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(request(i, due)))
    await asyncio.wait(tasks, timeout=60.0)  # then whatever is unanswered counts as an error
    for task in tasks:
        task.cancel()
    while not idle.empty():
        idle.get_nowait()[1].close()
    return [s for s in samples if s is not None]


def summary(samples: list[Sample], planned: int) -> dict[str, float]:
    latency = np.array([s.done - s.due for s in samples]) * 1000
    service = np.array([s.done - s.sent for s in samples]) * 1000
    span = max(s.done for s in samples) - min(s.due for s in samples)
    return {
        "planned": planned,
        "answered": sum(s.status == 200 for s in samples),
        "errors": planned - sum(s.status == 200 for s in samples),
        "rate": len(samples) / span,
        "p50": float(np.percentile(latency, 50)),
        "p90": float(np.percentile(latency, 90)),
        "p99": float(np.percentile(latency, 99)),
        "max": float(latency.max()),
        "service_p50": float(np.percentile(service, 50)),
        "service_p99": float(np.percentile(service, 99)),
    }


def train_locally(events, valid, spec, seed: int):  # type: ignore[no-untyped-def]
    """The next-basket scorer trained on the store's own weeks 1-40 (non-private), when no run
    is given; the store's local part fitted on weeks 41-45 as client/evaluation.py does."""
    import torch

    from client.evaluation import heldout_part
    from client.merchant_data import TrainingData, period_log
    from client.nextbasket_local import fit_local_state
    from client.nextbasket_training import train_scorer
    from client.training import LocalTraining
    from common.accounting import PrivacyUnit
    from common.nextbasket.model import BasketScorer, RecordTensors
    from common.nextbasket.records import training_records
    from common.nextbasket.spec import RecordSpec
    from common.rng import numpy_stream

    torch.manual_seed(seed)
    train = TrainingData.of(period_log([events], spec))
    records = RecordTensors.of(
        training_records(
            train.cases,
            train.features,
            train.items,
            unit=PrivacyUnit.EVENT,
            spec=RecordSpec(),
            rng=numpy_stream(seed, "serving-benchmark"),
        )
    )
    generator = torch.Generator().manual_seed(seed)
    result = train_scorer(
        model=BasketScorer(spec),
        records=records,
        settings=LocalTraining(batch_size=512, local_epochs=2),
        dp=None,
        sampling_generator=generator,
        noise_generator=generator,
    )
    periods = period_log([events, valid], spec)
    local = fit_local_state(
        merchant_id=str(events["merchant_id"].iloc[0]),
        shared=result.arrays,
        spec=spec,
        records=records,
        validation=heldout_part(periods, 2).heldout,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    note = (
        f"the next-basket scorer trained on the store's weeks 1-40 (non-private, 2 epochs, loss "
        f"{result.mean_loss:.3f}), with the store's local part fitted on weeks 41-45 "
        f"(blend {local.head.popularity_weight:g}, neighbour weight "
        f"{local.head.neighbour_weight:g}, "
        f"{'personal weights' if local.personal else 'no personal weights'})"
    )
    return result.arrays, local, note


def model_from_run(run: Path):  # type: ignore[no-untyped-def]
    from common.arrays_io import npz_to_arrays
    from common.config import RunConfig

    config = RunConfig.from_toml(run / "config.toml")
    arrays = npz_to_arrays((run / "model" / "final.npz").read_bytes())
    return arrays, config.model, f"the federated DP model of {run} (no local part)"


def perturbed(arrays: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in arrays.items()
    }


def start_service(config: Path, log: Path) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [*FEDSHOP, "serve", "--config", str(config), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not found:
        process.kill()
        raise SystemExit(f"fedshop serve did not start: {line!r}; see {log}")
    return process, int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", help="merchant (default: largest catalogue of the top 10)")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--model-run", type=Path, help="run directory with model/final.npz")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "serving.md")
    args = parser.parse_args()

    from machine_load import cpu_seconds, machine_jiffies, reference_work_seconds, stolen_share
    from report_section import write_section

    from client.evaluation import local_state_path
    from client.merchant import MerchantConfig
    from client.serving.config import ServingConfig
    from common.completejourney import load_merchants
    from common.events import REQUIRED_COLUMNS, write_events
    from common.nextbasket.spec import ScorerSpec
    from simulations.serving import deliver, platform_registry, publisher_for

    root = Path(tempfile.mkdtemp(prefix="fedshop-serving-"))
    every = load_merchants(top_n=10, min_rows=10_000)
    frame = every[every["week"] <= 40]
    sizes = frame.groupby("merchant_id")["product_id"].nunique()
    store = args.store or str(sizes.idxmax())
    events = frame[frame["merchant_id"] == store][list(REQUIRED_COLUMNS)].reset_index(drop=True)
    later = every[(every["merchant_id"] == store) & every["week"].between(41, 45)]
    valid = later[list(REQUIRED_COLUMNS)].reset_index(drop=True)
    home = root / store
    home.mkdir()
    write_events(events, home / "events.parquet")

    began = time.perf_counter()
    local = None
    if args.model_run is not None:
        arrays, spec, model_note = model_from_run(args.model_run)
    else:
        spec = ScorerSpec()
        arrays, local, model_note = train_locally(events, valid, spec, seed=1)
    print(f"model: {model_note} ({time.perf_counter() - began:.0f} s)", flush=True)

    registry, public = platform_registry(root / "platform" / "registry", keys=root / "platform")
    publisher = publisher_for(registry, root / "platform", spec)
    ids = [
        registry.register(a, parent=None, round=i, merchants=[], metrics={}, privacy={}).id
        for i, a in enumerate((arrays, perturbed(arrays, 2)), start=1)
    ]
    merchant = MerchantConfig(
        id=store,
        data=home / "events.parquet",
        state_dir=home / "state",
        signing_key=home / "unused.key",
        platform_key=public,
        serving=ServingConfig(reload_interval_s=1.0),
    )
    config_path = home / "merchant.toml"
    config_path.write_text(merchant.to_toml())
    if local is not None:
        local.save(local_state_path(merchant))

    def publish(version: int, reason: str) -> float:
        registry.promote(version, reason=reason)
        report = deliver(publisher.sign(reason=reason), [merchant])
        assert report.installed == {store: version}, report
        return time.perf_counter()

    publish(ids[0], "benchmark start")
    households = [str(c) for c in events["customer_id"].unique()]
    unknown = [f"new-customer-{i}" for i in range(max(1, len(households) // 9))]
    rng = np.random.default_rng(0)
    customers = list(rng.permutation(households + unknown))
    paths = [f"/recommendations?customer={c}&k=10" for c in customers]

    process, port = start_service(config_path, root / "serve.log")
    try:
        open_loop(port, paths, rate=args.rate, seconds=2.0)  # warm-up
        planned = int(args.rate * args.seconds)
        cpu_before, machine_before = cpu_seconds(process.pid), machine_jiffies()
        steady = open_loop(port, paths, rate=args.rate, seconds=args.seconds)
        cpu_ms = (cpu_seconds(process.pid) - cpu_before) * 1000 / len(steady)
        stolen = {"steady": stolen_share(machine_before)}
        swaps: list[float] = []
        schedule = [
            (0.25, ids[1], "promotion"),
            (0.5, ids[0], "rollback"),
            (0.75, ids[1], "promotion"),
        ]

        def publish_schedule(start: float, done: Connection) -> None:
            for fraction, version, reason in schedule:
                time.sleep(max(0.0, start + fraction * args.seconds - time.perf_counter()))
                done.send(publish(version, reason))
            done.close()

        # The platform's side of a swap (registry, signing, delivery) runs in its own process,
        # as it does in a deployment: in the load generator's process it would hold the GIL
        # and delay the generator's requests, which the latencies would then count.
        receiving, sending = multiprocessing.get_context("fork").Pipe(duplex=False)
        platform_side = multiprocessing.get_context("fork").Process(
            target=publish_schedule, args=(time.perf_counter() + 0.2, sending)
        )
        platform_side.start()
        sending.close()
        machine_before = machine_jiffies()
        swapping = open_loop(port, paths, rate=args.rate, seconds=args.seconds)
        stolen["swapping"] = stolen_share(machine_before)
        platform_side.join(timeout=120)
        while len(swaps) < len(schedule):
            try:
                swaps.append(receiving.recv())
            except EOFError:  # the publishing process ended early: said below
                break
        if platform_side.exitcode != 0 or len(swaps) != len(schedule):
            raise SystemExit(
                f"publishing failed (exit {platform_side.exitcode}, {len(swaps)} swaps)"
            )
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)

    versions = [s.version for s in sorted(swapping, key=lambda s: s.due)]
    switches = sum(1 for a, b in itertools.pairwise(versions) if a != b)
    ids_file = root / "customers.txt"
    batch_ids = households + [f"batch-new-{i}" for i in range(2000 - len(households))]
    ids_file.write_text("\n".join(batch_ids) + "\n")
    t0 = time.perf_counter()
    batch = subprocess.run(
        [
            *FEDSHOP,
            "recommend",
            "--config",
            str(config_path),
            "--customers",
            str(ids_file),
            "--out",
            str(root / "batch.parquet"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    batch_wall = time.perf_counter() - t0
    scored = re.search(
        r"scored (\d+) customers in ([\d.]+) s \(([\d,]+) customers/s\)", batch.stderr
    )
    assert scored, batch.stderr

    s, w = summary(steady, planned), summary(swapping, planned)
    s["stolen"], w["stolen"] = stolen["steady"], stolen["swapping"]
    body = render(
        store=store,
        catalogue=int(events["product_id"].nunique()),
        households=len(households),
        model_note=model_note,
        args=args,
        steady=s,
        swapping=w,
        switches=switches,
        exit_code=exit_code,
        batch=(int(scored.group(1)), float(scored.group(2)), scored.group(3), batch_wall),
        loadavg=os.getloadavg(),
        reference_s=reference_work_seconds(),
        cpu_ms=cpu_ms,
    )
    write_section(args.out, "serving-benchmark", body)
    print(body)
    return 0


def render(**m) -> str:  # type: ignore[no-untyped-def]
    s, w, args = m["steady"], m["swapping"], m["args"]
    n, seconds, rate_text, wall = m["batch"]
    machine = (
        f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"
    )

    load = ", ".join(f"{x:.1f}" for x in m["loadavg"])

    def row(name: str, r: dict) -> str:
        return (
            f"| {name} | {r['planned']:,} | {r['errors']} | {r['rate']:.1f} | {r['p50']:.1f} | "
            f"{r['p90']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {r['service_p99']:.1f} | "
            f"{r['stolen']:.0%} |"
        )

    verdict_p99 = "met" if max(s["p99"], w["p99"]) < 50 else "NOT met"
    verdict_err = "met" if s["errors"] == 0 and w["errors"] == 0 else "NOT met"
    return f"""## Measured (`python benchmarks/serving.py`)

Merchant: Complete Journey {m["store"]}, catalogue {m["catalogue"]:,} products (every product it
sold in weeks 1-40), {m["households"]} households plus 10% unknown customer ids (cold start).
Model: {m["model_note"]}. Machine: {machine}; the load generator and `fedshop serve` share it
(load average over 1/5/15 minutes at the end: {load}; other work on the machine counts in it;
a fixed piece of interpreter work took {m["reference_s"] * 1000:.0f} ms at the end,
`benchmarks/machine_load.py`, a measure of how fast the cores were).
Load: {args.rate:g} requests/s for {args.seconds:g} s per phase, open loop (latency from the
scheduled send time), top-10 over the full catalogue on loopback.

| Phase | Requests | Errors | req/s | p50 ms | p90 ms | p99 ms | max ms | p99 from send | stolen |
|---|---|---|---|---|---|---|---|---|---|
{row("steady", s)}
{row("3 hot swaps (promote, roll back, promote)", w)}

"p99 from send": in ms from the moment the generator wrote the request, without any wait
for a free connection. "stolen": the share of the machine's CPU time its hypervisor gave to
other machines during the phase (/proc/stat), time in which neither the service nor the
generator could run.

CPU time of `fedshop serve` per request in the steady phase: {m["cpu_ms"]:.1f} ms (user + system,
all threads; it follows the speed of the cores, like the reference work above).

The responses of the hot-swap phase changed model version {m["switches"]} times (3 publications;
concurrent requests around a swap may interleave). `fedshop serve` stopped with exit code
{m["exit_code"]} on SIGTERM.

Targets: p99 < 50 ms: **{verdict_p99}**; zero errors, also during the swaps: **{verdict_err}**.

Batch (`fedshop recommend --customers FILE`, {n:,} customer ids, top-10 each): scoring
{seconds:.2f} s, **{rate_text} customers/s**; the whole command including start-up, loading and
verifying the model and reading the events took {wall:.1f} s.
"""


if __name__ == "__main__":
    sys.exit(main())
