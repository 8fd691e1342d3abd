"""`make bench`: every benchmark that writes figures into docs/, in one go."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ["dp_throughput.py", "quality.py", "ledger_scale.py"]

for script in BENCHMARKS:
    path = ROOT / "benchmarks" / script
    if path.exists():
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(path)], check=True, cwd=ROOT)
