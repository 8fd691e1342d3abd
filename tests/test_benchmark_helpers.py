"""What the benchmarks read from the machine and from the proxy's log, checked on known input."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from machine_load import cpu_seconds, machine_jiffies, reference_work_seconds, stolen_share
from transport_overhead import fleet_request_seconds

# Lines as nginx writes them with the proxy's ``log_format fleet``
# (simulations/deployment/proxy.py); the last one has no upstream time (answered by nginx).
ACCESS_LOG = """\
127.0.0.1 - - [01/Dec/2026:20:01:02 +0000] "POST /api/v0/fleet/pull-object HTTP/1.1" 200 812 \
request_s=0.031 superlink_s=0.031 at=1764619262.123
127.0.0.1 - - [01/Dec/2026:20:01:02 +0000] "POST /api/v0/fleet/pull-object HTTP/1.1" 200 90 \
request_s=0.011 superlink_s=0.011 at=1764619262.200
127.0.0.1 - - [01/Dec/2026:20:01:02 +0000] "POST /api/v0/fleet/pull-object HTTP/1.1" 200 90 \
request_s=0.120 superlink_s=0.120 at=1764619262.300
127.0.0.1 - - [01/Dec/2026:20:01:03 +0000] "POST /api/v0/fleet/push-messages HTTP/1.1" 200 40 \
request_s=0.044 superlink_s=0.043 at=1764619263.001
127.0.0.1 - - [01/Dec/2026:20:01:04 +0000] "GET /favicon.ico HTTP/1.1" 404 0 \
request_s=0.000 superlink_s=- at=1764619264.000
"""


def test_fleet_requests_are_counted_per_call_with_median_and_max(tmp_path: Path) -> None:
    log = tmp_path / "proxy-access.log"
    log.write_text(ACCESS_LOG)
    found = fleet_request_seconds(log)
    assert found == {
        "pull-object": {"count": 3, "median_s": 0.031, "max_s": 0.120},
        "push-messages": {"count": 1, "median_s": 0.044, "max_s": 0.044},
    }


def test_machine_figures_are_shares_and_seconds() -> None:
    before = machine_jiffies()
    assert 0 <= before[0] <= before[1]
    assert cpu_seconds(os.getpid()) > 0
    reference = reference_work_seconds(repeats=2)
    assert 0.001 < reference < 10
    assert 0.0 <= stolen_share(before) <= 1.0


def test_per_seed_counts_pair_trained_methods_by_seed_and_reuse_one_seed_baselines() -> None:
    from types import SimpleNamespace

    import numpy as np
    from quality_report import CENTRAL, FEDERATED, LOCAL_DP, P_TOPFREQ, TIFU, _per_seed_counts

    def method(*seeds: dict[str, float]) -> SimpleNamespace:
        return SimpleNamespace(
            seeds=[{m: {"ndcg@10": np.array([v, v])} for m, v in s.items()} for s in seeds]
        )

    report = SimpleNamespace(
        merchants=["a", "b"],
        methods={
            P_TOPFREQ: method({"a": 0.5, "b": 0.3}),
            TIFU: method({"a": 0.4, "b": 0.35}),
            LOCAL_DP: method({"a": 0.45, "b": 0.2}, {"a": 0.55, "b": 0.2}),
            FEDERATED: method({"a": 0.6, "b": 0.3}, {"a": 0.5, "b": 0.29}),
            CENTRAL: method({"a": 0.7, "b": 0.4}, {"a": 0.5, "b": 0.36}),
        },
    )
    # Seed 0: best local a 0.5 (P-TopFreq), b 0.35 (TIFU); seed 1: a 0.55 (local DP seed 1).
    # A tie with P-TopFreq counts as "at or above", never as "above".
    assert _per_seed_counts(report) == [  # type: ignore[arg-type]
        {
            "seed": 0,
            "federated_at_or_above_p_topfreq": 2,
            "federated_above_best_local": 1,
            "central_above_best_local": 2,
        },
        {
            "seed": 1,
            "federated_at_or_above_p_topfreq": 1,
            "federated_above_best_local": 0,
            "central_above_best_local": 1,
        },
    ]
