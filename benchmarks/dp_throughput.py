"""DP-SGD training throughput and peak memory against non-private training of the same model.

Each mode runs in its own process (so peak RSS is that mode's own), on the same real records
(one Complete Journey store's training weeks), same batch size and steps. Writes
docs/throughput.md. Usage: python benchmarks/dp_throughput.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
    slowdown = results["plain"]["examples_per_s"] / results["dp"]["examples_per_s"]
    memory = results["dp"]["peak_rss_mb"] / results["plain"]["peak_rss_mb"]
    text = f"""# DP training throughput ({args.device})

Measured by `python benchmarks/dp_throughput.py --device {args.device}` in one run: the same model
(ModelSpec defaults, {results["dp"]["records"]:,} event-level records of the largest Complete Journey
store, batch {args.batch_size}, {args.epochs} epochs, {args.threads} thread(s)), each mode in its own
process. Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}.

| mode | examples/s | seconds | peak RSS (MB) |
|---|---|---|---|
| non-private | {results["plain"]["examples_per_s"]:,.0f} | {results["plain"]["seconds"]:.1f} | {results["plain"]["peak_rss_mb"]:,.0f} |
| DP-SGD (ghost clipping, Poisson) | {results["dp"]["examples_per_s"]:,.0f} | {results["dp"]["seconds"]:.1f} | {results["dp"]["peak_rss_mb"]:,.0f} |

- DP slowdown: **{slowdown:.2f}x** (target <= 4x).
- DP peak memory / non-private: **{memory:.2f}x** (target <= 2x).
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
