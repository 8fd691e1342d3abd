"""DP-SGD training throughput and peak memory against non-private training of the same model.

Each mode runs in its own process (so peak RSS is that mode's own), on the same real records
(one Complete Journey store's training weeks), same batch size and steps. Writes
docs/throughput.md. Usage: python benchmarks/dp_throughput.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def rss_growth(peak: dict[str, float]) -> Iterator[None]:
    """Peak resident memory above the level at entry, sampled every 5 ms.

    The whole-process peak is dominated by torch and pandas, which both modes share; the
    growth during training is what DP itself costs.
    """
    base = _rss_mb()
    peak["growth_mb"] = 0.0
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["growth_mb"] = max(peak["growth_mb"], _rss_mb() - base)
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        peak["growth_mb"] = max(peak["growth_mb"], _rss_mb() - base)


def measure(mode: str, device: str, batch_size: int, epochs: int, threads: int) -> dict[str, float]:
    import torch

    from client.training import DPSettings, LocalTraining, train_round
    from common.accounting import PrivacyUnit
    from common.completejourney import load_merchants
    from common.features import build_catalog, encode_events, training_records
    from common.model import ModelSpec, Recommender
    from common.rng import numpy_stream, torch_stream

    torch.set_num_threads(threads)
    events = load_merchants(top_n=1)
    events = events[events["week"] <= 40]
    spec = ModelSpec()
    records = training_records(
        encode_events(events, spec),
        build_catalog(events, spec),
        unit=PrivacyUnit.EVENT,
        negatives=4,
        events_per_customer=1,
        rng=numpy_stream(0, "bench"),
    )
    model = Recommender(spec).to(device)
    dp = DPSettings(noise_multiplier=1.0, clipping_norm=1.0) if mode == "dp" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    growth: dict[str, float] = {}
    with rss_growth(growth):
        began = time.perf_counter()
        result = train_round(
            model=model,
            records=records,
            settings=LocalTraining(batch_size=batch_size, local_epochs=epochs),
            dp=dp,
            sampling_generator=torch_stream(0, "s"),
            noise_generator=torch_stream(0, "n", device=device),
        )
        seconds = time.perf_counter() - began
    out = {
        "examples_per_s": len(records) * epochs / seconds,
        "seconds": seconds,
        "records": len(records),
        "loss": result.mean_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "training_rss_mb": growth["growth_mb"],
    }
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=["dp", "plain"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "throughput.md")
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(
                measure(args.worker, args.device, args.batch_size, args.epochs, args.threads)
            )
        )
        return
    results = {}
    for mode in ("plain", "dp"):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            mode,
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
            "--epochs",
            str(args.epochs),
            "--threads",
            str(args.threads),
        ]
        line = (
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        results[mode] = json.loads(line)
    plain, dp = results["plain"], results["dp"]
    slowdown = plain["examples_per_s"] / dp["examples_per_s"]
    memory = dp["peak_rss_mb"] / plain["peak_rss_mb"]
    growth = dp["training_rss_mb"] / max(plain["training_rss_mb"], 1.0)
    machine = platform.processor() or platform.machine()
    rows = [
        ("non-private", plain),
        ("DP-SGD (ghost clipping, Poisson)", dp),
    ]
    table = "\n".join(
        f"| {name} | {r['examples_per_s']:,.0f} | {r['seconds']:.1f} | "
        f"{r['peak_rss_mb']:,.0f} | {r['training_rss_mb']:,.0f} |"
        for name, r in rows
    )
    text = f"""# DP training throughput ({args.device})

Measured by `python benchmarks/dp_throughput.py --device {args.device}` in one run: the same
model (ModelSpec defaults) on {dp["records"]:,} event-level records of the largest Complete
Journey store, batch {args.batch_size}, {args.epochs} epochs, {args.threads} thread(s), each
mode in its own process. Machine: {machine}, {os.cpu_count()} cores, Python
{platform.python_version()}.

| mode | examples/s | seconds | peak RSS (MB) | RSS growth while training (MB) |
|---|---|---|---|---|
{table}

- DP slowdown: **{slowdown:.2f}x** (target <= 4x).
- DP peak memory / non-private: **{memory:.2f}x** for the whole process (target <= 2x);
  **{growth:.2f}x** for the memory training itself adds.
"""
    if args.device == "cuda":
        text += (
            f"- Peak GPU memory: non-private {results['plain']['peak_gpu_mb']:,.0f} MB, "
            f"DP {results['dp']['peak_gpu_mb']:,.0f} MB.\n"
        )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
