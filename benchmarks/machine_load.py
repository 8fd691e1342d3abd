"""What else keeps this machine busy while a benchmark measures time: read from /proc.

Benchmarks that report seconds on a shared machine print this beside their figures, so a slow
row can be told apart from a slow program.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_ticks(pid: int) -> int:
    """CPU ticks (user + system, all threads) a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) + int(stat[12])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    return process_ticks(pid) / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(stolen, total) CPU time of the whole machine so far, from /proc/stat: "stolen" is time
    the hypervisor gave this machine's virtual CPUs to someone else while they had work."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def stolen_share(before: tuple[int, int]) -> float:
    """Share of the machine's CPU time stolen since ``before`` (a :func:`machine_jiffies`)."""
    stolen, total = machine_jiffies()
    return (stolen - before[0]) / max(1, total - before[1])


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    """CPU ticks (user + system) and a short command line of every process."""
    found: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ticks = process_ticks(int(entry.name))
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        words = [os.path.basename(argv[0].decode(errors="replace"))] if argv[0] else []
        words += [a.decode(errors="replace") for a in argv[1:4] if a]
        found[int(entry.name)] = (ticks, " ".join(words)[:80])
    return found


def busy_processes(*, seconds: float = 1.0, threshold: float = 0.2) -> str:
    """Other processes that used at least ``threshold`` of a core over ``seconds``, busiest first
    ("" when none): this process is left out."""
    before = _cpu_ticks()
    time.sleep(seconds)
    after = _cpu_ticks()
    per_second = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (ticks, command) in after.items():
        if pid == os.getpid() or pid not in before:
            continue
        share = (ticks - before[pid][0]) / per_second / seconds
        if share >= threshold:
            busy.append((share, command))
    return "; ".join(f"{cmd} ({share:.0%} of a core)" for share, cmd in sorted(busy, reverse=True))


def reference_work_seconds(*, repeats: int = 5) -> float:
    """Fastest of ``repeats`` runs of a fixed piece of interpreter work (a loop of dict and
    string operations, about 0.03 s on a fast, quiet core): how fast the cores are at the
    moment. The same code measured on different days differs by several times on a shared
    host; this number, printed beside the figures, tells the machine's share from the program's."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        table: dict[str, int] = {}
        for i in range(200_000):
            key = f"k{i % 1000}"
            table[key] = table.get(key, 0) + i
        best = min(best, time.perf_counter() - start)
    return best
