"""Measurement helpers: latency percentiles and CPU time of processes read from /proc."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def percentiles(samples_ms: Sequence[float]) -> dict[str, float] | None:
    if not samples_ms:
        return None
    s = sorted(samples_ms)

    def pick(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))], 3)

    return {"p50": pick(0.50), "p99": pick(0.99), "p999": pick(0.999), "max": round(s[-1], 3)}


class Reservoir:
    """A bounded uniform sample of a stream (percentiles stay exact enough, memory stays flat)."""

    def __init__(self, size: int = 50_000, seed: int = 7) -> None:
        self.size = size
        self.seen = 0
        self.items: list[float] = []
        self._rng = random.Random(seed)  # noqa: S311 - sampling, not security

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(value)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = value


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """User + system CPU seconds of one process (0 if it is gone); with ``reaped``, plus those
    of its children that have exited and been waited for (``cutime`` + ``cstime``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. PostgreSQL backends of a postmaster)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(stat[1]) == pid:
            out.append(int(entry.name))
    return out


def pids_named(name: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if comm == name:
            out.append(int(entry.name))
    return out


@dataclass
class CpuMeter:
    """CPU seconds spent by ``roots`` between ``start`` and ``stop``. With ``include_children``
    (a PostgreSQL postmaster), also by their children: the live ones read directly, and those
    that exited in between (a client's backends when it disconnects, autovacuum workers)
    through the root's reaped-children time, which the kernel adds when the root waits for
    them. A child's time thus moves from one sum to the other and is counted once."""

    roots: tuple[int, ...]
    include_children: bool = False
    _start: float | None = None

    def _total(self) -> float:
        total = 0.0
        for r in self.roots:
            total += cpu_seconds(r, reaped=self.include_children)
            if self.include_children:
                total += sum(cpu_seconds(c) for c in children(r))
        return total

    def start(self) -> None:
        self._start = self._total()

    def stop(self) -> float:
        assert self._start is not None
        return self._total() - self._start
