"""The benchmark's own arithmetic: percentiles, sampling, CPU accounting, report rows."""

from __future__ import annotations

import os
import subprocess
import sys

from securebroker.bench.runner import markdown
from securebroker.bench.stats import TICKS, CpuMeter, Reservoir, cpu_seconds, percentiles


def test_percentiles_pick_ranks() -> None:
    p = percentiles([float(i) for i in range(1, 1001)])
    assert p == {"p50": 501.0, "p99": 991.0, "p999": 1000.0, "max": 1000.0}
    assert percentiles([]) is None


def test_reservoir_is_bounded_and_counts_everything() -> None:
    r = Reservoir(size=100)
    for i in range(10_000):
        r.add(float(i))
    assert r.seen == 10_000
    assert len(r.items) == 100
    assert max(r.items) > 5_000  # later items get in too


def test_cpu_meter_sees_own_work() -> None:
    meter = CpuMeter((os.getpid(),))
    meter.start()
    sum(i * i for i in range(300_000))
    assert meter.stop() > 0
    assert cpu_seconds(2**22 + 12345) == 0.0  # a pid that does not exist


def test_cpu_meter_counts_children_that_exit_before_it_stops() -> None:
    """A client's PostgreSQL backends (and autovacuum workers) come and go during a workload:
    their CPU must be counted although they are gone when the meter stops."""
    meter = CpuMeter((os.getpid(),), include_children=True)
    before = os.times()
    meter.start()
    # a child that burns CPU and exits (waited for) while the meter runs
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    measured = meter.stop()
    after = os.times()
    child = (after.children_user + after.children_system) - (
        before.children_user + before.children_system
    )
    assert child > 0
    assert round(measured * TICKS) >= round(child * TICKS)  # in clock ticks: no float noise


def test_markdown_rows_include_errors_and_numbers() -> None:
    meta = {"started": "t", "machine": "m", "mode": "quick", "command": "securebroker bench"}
    text = markdown(
        [
            {
                "peer": "securebroker",
                "workload": "W2",
                "label": "W2",
                "publish_rate": 12345.6,
                "consume_rate": None,
                "confirm_latency_ms": {"p50": 1.0, "p99": 2.0, "p999": 3.0, "max": 4.0},
                "e2e_latency_ms": None,
                "cpu_us_per_message": {"broker": 50.0},
                "errors": 0,
            },
            {"peer": "nats-jetstream", "workload": "W2", "label": "W2", "error": "not listening"},
        ],
        meta,
    )
    assert "| W2 | securebroker | 12,346 | 0 | 1.0 / 2.0 / 3.0 | — | broker 50.0 | 0 |" in text
    assert "| W2 | nats-jetstream | — | — | — | — | — | not listening |" in text
