"""securebroker's workload driver: the same contract as the peer drivers in bench/peers/.

Run as ``python -m securebroker.bench.sbdriver '<json>'``; prints one JSON result line. The main
process splits publishers and consumers over ``procs`` worker processes (so the Python load
generator is not one core's worth of bottleneck), then merges their counts and latency samples.
Each worker uses the real SDK over mutual TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securebroker.bench.stats import Reservoir, percentiles
from securebroker.client import Client, connect

TS = struct.Struct("<d")


@dataclass
class Phase:
    start: float = 0.0
    end: float = 0.0

    def mark(self, t: float) -> None:
        if not self.start or t < self.start:
            self.start = t
        self.end = max(self.end, t)


@dataclass
class WorkerResult:
    published: int = 0
    confirmed: int = 0
    delivered: int = 0
    acked: int = 0
    errors: int = 0
    pub: Phase = field(default_factory=Phase)
    con: Phase = field(default_factory=Phase)
    confirm: Reservoir = field(default_factory=Reservoir)
    e2e: Reservoir = field(default_factory=Reservoir)


async def _client(cfg: dict[str, Any]) -> Client:
    host, port = cfg["url"].rsplit(":", 1)
    tls = cfg["tls"]
    return await connect(
        host,
        int(port),
        cert=tls["cert"],
        key=tls["key"],
        ca=tls["ca"],
        token=tls.get("token"),
        reconnect=False,
        connect_timeout=60,
    )


async def _publisher(cfg: dict[str, Any], quota: int, rate: float, r: WorkerResult) -> None:
    client = await _client(cfg)
    payload_tail = os.urandom(max(cfg["size"] - TS.size, 0))
    deadline = time.time() + cfg["duration_s"]
    next_id = iter(range(quota))
    interval = 1.0 / rate if rate else 0.0
    t0 = time.time()
    sent = 0

    async def lane() -> None:
        nonlocal sent
        for _ in next_id:
            now = time.time()
            if now > deadline:
                return
            if interval:
                due = t0 + sent * interval
                sent += 1
                if due > now:
                    await asyncio.sleep(due - now)  # pacing a fixed offered rate
            start = time.time()
            r.published += 1
            try:
                await client.publish(cfg["topic"], TS.pack(start) + payload_tail)
            except Exception:  # noqa: BLE001 - counted, reported
                r.errors += 1
                continue
            done = time.time()
            r.confirmed += 1
            r.confirm.add((done - start) * 1000)
            r.pub.mark(start)
            r.pub.mark(done)

    try:
        await asyncio.gather(*(lane() for _ in range(max(cfg["inflight"], 1))))
    finally:
        await client.close()


async def _consumer(cfg: dict[str, Any], sub: str, r: WorkerResult, stop_idle: float) -> None:
    client = await _client(cfg)
    deadline = time.time() + cfg["duration_s"]
    subscription = client.consume(sub, credit=max(cfg["inflight"], 1))
    pending: set[asyncio.Task[None]] = set()

    async def ack(m: Any) -> None:
        try:
            await m.ack()
        except Exception:  # noqa: BLE001 - counted, reported
            r.errors += 1
            return
        r.acked += 1
        r.con.mark(time.time())

    try:
        while time.time() < deadline:
            try:
                async with asyncio.timeout(stop_idle):
                    m = await subscription.__anext__()
            except (TimeoutError, StopAsyncIteration):
                if r.delivered or time.time() > deadline:
                    break
                continue
            now = time.time()
            r.delivered += 1
            r.con.mark(now)
            if len(m.payload) >= TS.size:
                r.e2e.add((now - TS.unpack_from(m.payload)[0]) * 1000)
            task = asyncio.ensure_future(ack(m))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    finally:
        await subscription.close()
        await client.close()


async def worker(cfg: dict[str, Any]) -> WorkerResult:
    r = WorkerResult()
    jobs = []
    per_pub = cfg["messages_per_publisher"]
    for _ in range(cfg["publishers"]):
        jobs.append(_publisher(cfg, per_pub, cfg["rate_per_publisher"], r))
    for sub in cfg["consumer_subscriptions"]:
        jobs.append(_consumer(cfg, sub, r, cfg.get("stop_idle", 2.0)))
    await asyncio.gather(*jobs)
    return r


def _run_worker(cfg: dict[str, Any]) -> None:
    try:
        import uvloop  # noqa: PLC0415

        r = uvloop.run(worker(cfg))
    except ImportError:
        r = asyncio.run(worker(cfg))
    out = {
        "published": r.published,
        "confirmed": r.confirmed,
        "delivered": r.delivered,
        "acked": r.acked,
        "errors": r.errors,
        "pub": [r.pub.start, r.pub.end],
        "con": [r.con.start, r.con.end],
        "confirm": r.confirm.items,
        "e2e": r.e2e.items,
        "cpu_s": sum(os.times()[:2]),
    }
    # A file, not stdout: an event loop may leave stdout non-blocking, truncating big writes.
    with open(cfg["result_file"], "w", encoding="utf-8") as fh:
        json.dump(out, fh)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _spawn(cfgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="sb-driver-") as tmp:
        files = [Path(tmp) / f"worker-{i}.json" for i in range(len(cfgs))]
        procs = [
            subprocess.Popen(  # noqa: S603 - our own module, arguments we built
                [
                    sys.executable,
                    "-m",
                    "securebroker.bench.sbdriver",
                    json.dumps(c | {"result_file": str(f)}),
                ]
            )
            for c, f in zip(cfgs, files, strict=True)
        ]
        results = []
        for p, f in zip(procs, files, strict=True):
            p.wait(timeout=max(c["duration_s"] for c in cfgs) + 60)
            results.append(json.loads(f.read_text()) if f.exists() else {"errors": 1})
        return results


def _phase(results: list[dict[str, Any]], key: str) -> float:
    starts = [r[key][0] for r in results if r.get(key) and r[key][0]]
    ends = [r[key][1] for r in results if r.get(key) and r[key][1]]
    return max(ends) - min(starts) if starts and ends else 0.0


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one workload from the common driver spec (see bench/peers/README.md)."""
    wl = spec["workload"]
    procs = max(1, spec.get("procs", 2))
    publishers = spec.get("publishers", 1)
    consumers = spec.get("consumers", 0)
    subs: list[str] = spec["subscriptions_names"]
    base = {
        "url": spec["url"],
        "tls": spec["tls"],
        "topic": spec["topic"],
        "size": spec["size"],
        "duration_s": spec["duration_s"],
        "inflight": spec["inflight"],
    }
    consumer_list = [
        subs[i % len(subs)] for i in range(consumers * (len(subs) if wl == "W4" else 1))
    ]

    def cfgs(pubs: int, cons: list[str], messages: int, rate: float) -> list[dict[str, Any]]:
        n = min(procs, max(pubs + len(cons), 1))
        pub_split = _split(pubs, n)
        msg_split = _split(messages, max(pubs, 1))
        out = []
        for i in range(n):
            mine = cons[i::n]
            out.append(
                base
                | {
                    "role": "worker",
                    "publishers": pub_split[i],
                    "messages_per_publisher": msg_split[0] if pubs else 0,
                    "rate_per_publisher": rate / pubs if rate and pubs else 0,
                    "consumer_subscriptions": mine,
                }
            )
        return out

    if wl == "W5":
        fill = _spawn(cfgs(publishers, [], spec["messages"], 0))
        drain = _spawn(cfgs(0, consumer_list, 0, 0))
        results = fill + drain
    else:
        pubs = publishers
        results = _spawn(
            cfgs(pubs, consumer_list if wl != "W2" else [], spec["messages"], spec.get("rate", 0))
        )
    confirmed = sum(r.get("confirmed", 0) for r in results)
    acked = sum(r.get("acked", 0) for r in results)
    pub_s = _phase(results, "pub")
    con_s = _phase(results, "con")
    confirm = [x for r in results for x in r.get("confirm", [])]
    e2e = [x for r in results for x in r.get("e2e", [])]
    client_cpu = sum(r.get("cpu_s", 0.0) for r in results)
    n = max(confirmed, acked, 1)
    return {
        "peer": "securebroker",
        "workload": wl,
        "published": sum(r.get("published", 0) for r in results),
        "confirmed": confirmed,
        "delivered": sum(r.get("delivered", 0) for r in results),
        "acked": acked,
        "errors": sum(r.get("errors", 0) for r in results),
        "duration_s": round(max(pub_s, con_s), 3),
        "publish_rate": round(confirmed / pub_s, 1) if pub_s else 0,
        "consume_rate": round(acked / con_s, 1) if con_s else 0,
        "confirm_latency_ms": percentiles(confirm),
        "e2e_latency_ms": percentiles(e2e),
        "client_cpu_us_per_message": round(client_cpu * 1e6 / n, 1),
        "notes": f"{procs} client processes, SDK over mTLS, inflight {spec['inflight']}",
        "error": None,
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg.get("role") == "worker":
        with contextlib.suppress(KeyboardInterrupt):
            _run_worker(cfg)
        return
    sys.stdout.write(json.dumps(run(cfg)) + "\n")


if __name__ == "__main__":
    main()
