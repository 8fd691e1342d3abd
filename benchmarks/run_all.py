"""`make bench`: every benchmark that writes figures into docs/, in one go (hours on 2 cores;
the quality benchmark resumes from its finished jobs). Each step is one command; a failing
step stops the run with its exit code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
STEPS: list[list[str]] = [
    # Every recommender (baselines, centralised, local-only, federated, DP at two units) on the
    # same full-ranking cases: docs/results.md. Finished jobs are kept under runs/quality-jobs.
    [PY, "benchmarks/quality.py"],
    [PY, "benchmarks/dp_throughput.py"],
    # Frozen vs refreshed features vs online fine-tuning vs weekly retraining.
    [PY, "benchmarks/online.py"],
    # The serving benchmark serves the federated model of an online simulation.
    [PY, "-m", "simulations.cli", "simulate", "--online", "--out", "runs/online"],
    [PY, "benchmarks/freshness.py"],
    # Serving latency with the online simulation's federated DP model.
    [PY, "benchmarks/serving.py", "--model-run", "runs/online"],
    [PY, "benchmarks/ledger_scale.py"],
    # 10, 100 and 1,000 synthetic merchants: time, platform memory, bytes, ledger and audit.
    [PY, "benchmarks/scale.py"],
    # Replies with float32 vs float16 weights: bytes and a paired quality run (docs/scale.md).
    [PY, "benchmarks/update_dtype.py"],
]

# Fresh run directories: a simulation refuses to write into a non-empty one.
for stale in ("runs/online",):
    shutil.rmtree(ROOT / stale, ignore_errors=True)

for step in STEPS:
    print("==", " ".join(step[1:]), flush=True)
    subprocess.run(step, check=True, cwd=ROOT)
