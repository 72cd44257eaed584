#!/usr/bin/env python
"""pgqueuer peer driver for the securebroker benchmark (see README.md beside this file).

    python bench/peers/pgqueuer_driver.py '{"workload": "W2", "url": "postgresql://...",
        "size": 1024, "messages": 20000, "duration_s": 30, "publishers": 2, "consumers": 2,
        "inflight": 8, "rate": 0, "subscriptions": 5, "options": {"batch_size": 100}}'

Prints ONE JSON line on stdout at the end; progress and logs go to stderr.

pgqueuer (a PostgreSQL job queue from PyPI) on the DSN in ``url``. Every run installs pgqueuer's
tables, enum, function and trigger under a unique prefix (``PGQUEUER_PREFIX``) and uninstalls them
at the end, on error too.

- A publish is ``Queries.enqueue(entrypoint, payload)``: one INSERT in its own transaction
  (autocommit), so a publish is confirmed when its commit returns, i.e. after the WAL fsync with
  ``synchronous_commit=on``. PostgreSQL runs one transaction at a time per connection, so a
  publisher keeps ``inflight`` enqueues in flight over ``inflight`` connections (capped by the
  ``max_conns_per_publisher`` option, default 16).
- A consumer is a ``QueueManager`` worker: it dequeues batches of ``batch_size`` jobs (``FOR
  UPDATE SKIP LOCKED``) and runs the entrypoint; a job counts as acked when its entrypoint returns,
  and pgqueuer then completes it (DELETE from the queue table + INSERT into the log table) in
  batches through its own status buffer, flushed every ``batch_size`` jobs or 0.1 s.
- W4 (fan-out) is unsupported: pgqueuer has no topics or subscriptions, a job goes to one worker.

Publishers and consumers are separate processes (``multiprocessing``, spawn): a Python client
is CPU-heavy, so one process per publisher and per consumer; the notes give each process's CPU use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import struct
import sys
import time
import traceback
import uuid
from array import array
from collections.abc import Callable, Coroutine
from typing import Any

ENTRYPOINT = "bench"
GO_TIMEOUT_S = 600.0
PEER = "pgqueuer"
START_HINT = (
    "pass the DSN of a running PostgreSQL in url (the benchmark uses securebroker's embedded "
    "PostgreSQL; for a trial `postgresql://postgres@127.0.0.1:5432/postgres`)"
)


def now_ms() -> float:
    """Wall clock in ms (float), the same clock as the Node drivers' timestamps."""
    return time.time() * 1000.0


def log(*a: object) -> None:
    print(f"[pgqueuer {os.getpid()}]", *a, file=sys.stderr, flush=True)


def percentiles(arrays: list[bytes]) -> dict[str, float] | None:
    vals = array("d")
    for b in arrays:
        vals.frombytes(b)
    n = len(vals)
    if n == 0:
        return None
    s = sorted(vals)

    def at(q: float) -> float:
        return round(s[min(n - 1, max(0, math.ceil(q * n) - 1))], 3)

    return {"p50": at(0.5), "p99": at(0.99), "p999": at(0.999), "max": round(s[-1], 3)}


def split(total: int, parts: int) -> list[int]:
    base = total // parts
    return [base + (1 if i < total % parts else 0) for i in range(parts)]


def parse_config(raw: str) -> dict[str, Any]:
    c = json.loads(raw)
    o = c.get("options") or {}
    cfg = {
        "workload": str(c.get("workload", "W2")).upper(),
        "url": c.get("url") or "",
        "size": max(8, int(c.get("size", 1024))),
        "messages": max(0, int(c.get("messages", 10000))),
        "duration_s": max(1.0, float(c.get("duration_s", 30))),
        "publishers": max(1, int(c.get("publishers", 1))),
        "consumers": max(0, int(c.get("consumers", 0))),
        "inflight": max(1, int(c.get("inflight", 1))),
        "rate": max(0.0, float(c.get("rate", 0))),
        "subscriptions": max(1, int(c.get("subscriptions", 5))),
        "options": o,
        "batch_size": max(1, int(o.get("batch_size", 100))),
        "max_conns_per_publisher": max(1, int(o.get("max_conns_per_publisher", 16))),
        "drain_timeout_s": max(1.0, float(o.get("drain_timeout_s", 20))),
        "fill_batch": max(1, int(o.get("fill_batch", 500))),
    }
    if cfg["workload"] not in ("W1", "W2", "W3", "W4", "W5"):
        raise ValueError(f"unknown workload {cfg['workload']}")
    if not cfg["url"]:
        raise ValueError(f"no DSN in url: {START_HINT}")
    if cfg["workload"] == "W1":
        cfg["publishers"] = 1
        cfg["inflight"] = 1
    if cfg["workload"] in ("W1", "W2"):
        cfg["consumers"] = 0
    if cfg["workload"] in ("W3", "W5") and cfg["consumers"] < 1:
        cfg["consumers"] = 1
    cfg["conns"] = min(cfg["inflight"], cfg["max_conns_per_publisher"])
    return cfg


def _fast_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# ---------------------------------------------------------------- client processes


def client_proc(
    role: str,
    idx: int,
    result_q: Any,
    body: Callable[..., Coroutine[Any, Any, dict[str, Any]]],
    args: tuple[Any, ...],
) -> None:
    """A publisher or consumer process: runs ``body(*args)``, hands its result or failure up."""
    _fast_loop()
    try:
        res = asyncio.run(body(*args))
    except BaseException as e:  # noqa: BLE001 (any failure goes to the parent)
        result_q.put(
            {
                "role": role,
                "idx": idx,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(),
            }
        )
        return
    result_q.put(res)


async def _ready_then_wait(role: str, idx: int, ready_q: Any, go: Any) -> None:
    """Tell the parent this process is connected, then wait for its go."""
    ready_q.put((role, idx))
    if not await asyncio.to_thread(go.wait, GO_TIMEOUT_S):
        raise TimeoutError("never told to start")


def _cpu_share(cpu0: float, t0_ms: float) -> float:
    """This process's CPU time since ``cpu0`` over the wall time since ``t0_ms``."""
    wall = (now_ms() - t0_ms) / 1000.0
    return (time.process_time() - cpu0) / wall if wall > 0 else 0.0


# ---------------------------------------------------------------- publisher process


async def _publisher(
    idx: int,
    cfg: dict[str, Any],
    quota: int,
    rate: float,
    measure: bool,
    ready_q: Any,
    go: Any,
    deadline_v: Any,
) -> dict[str, Any]:
    import asyncpg  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)
    from pgqueuer.queries import Queries  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)

    conns = [await asyncpg.connect(cfg["url"]) for _ in range(cfg["conns"])]
    queries = [Queries.from_asyncpg_connection(c) for c in conns]
    template = os.urandom(cfg["size"])
    await _ready_then_wait("publisher", idx, ready_q, go)
    deadline = deadline_v.value
    cpu0 = time.process_time()
    st = {"published": 0, "confirmed": 0, "nacked": 0, "start": now_ms(), "end": 0.0}
    lat = array("d")
    interval = 1000.0 / rate if rate > 0 else 0.0
    errors: list[str] = []

    batch = cfg["fill_batch"] if cfg["workload"] == "W5" else 1

    async def lane(q: Any) -> None:
        while st["published"] < quota and now_ms() < deadline:
            n = min(batch, quota - st["published"])
            st["published"] += n  # claim the slots before any wait
            if interval:
                wait = st["start"] + (st["published"] - n) * interval - now_ms()
                if wait > 0:
                    await asyncio.sleep(wait / 1000.0)
            t = now_ms()
            payload = struct.pack("<d", t) + template[8:]
            try:
                if n == 1:
                    await q.enqueue(ENTRYPOINT, payload)
                else:  # W5 fill only: n jobs in one committed INSERT
                    await q.enqueue([ENTRYPOINT] * n, [payload] * n, [0] * n)
            except Exception as e:  # noqa: BLE001 (a failed enqueue is counted, not fatal)
                st["nacked"] += n
                if len(errors) < 3:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            tc = now_ms()
            st["confirmed"] += n
            st["end"] = tc
            if measure:
                lat.append(tc - t)

    await asyncio.gather(*(lane(q) for q in queries))
    cpu = _cpu_share(cpu0, st["start"])
    for c in conns:
        await c.close()
    if not st["end"]:
        st["end"] = now_ms()
    return {
        "role": "publisher",
        "idx": idx,
        "error": None,
        **st,
        "cpu": cpu,
        "lat": lat.tobytes(),
        "errors": errors,
    }


# ---------------------------------------------------------------- consumer process


async def _consumer(
    idx: int,
    cfg: dict[str, Any],
    measure: bool,
    ready_q: Any,
    go: Any,
    stop: Any,
    acked_arr: Any,
    last_arr: Any,
) -> dict[str, Any]:
    from datetime import timedelta  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)

    import asyncpg  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)
    from pgqueuer.models import Job  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)
    from pgqueuer.qm import QueueManager  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)
    from pgqueuer.queries import Queries  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)

    conn = await asyncpg.connect(cfg["url"])
    qm = QueueManager(Queries.from_asyncpg_connection(conn))
    lat = array("d")
    st = {"delivered": 0, "acked": 0, "first": 0.0, "last": 0.0}

    @qm.entrypoint(ENTRYPOINT)
    async def handle(job: Job) -> None:
        t = now_ms()
        st["delivered"] += 1
        if measure and job.payload:
            lat.append(t - struct.unpack_from("<d", job.payload)[0])
        st["acked"] += 1
        if not st["first"]:
            st["first"] = t
        st["last"] = t

    await _ready_then_wait("consumer", idx, ready_q, go)
    cpu0 = time.process_time()
    t0 = now_ms()

    async def watch() -> None:
        while not stop.is_set():
            acked_arr[idx] = st["acked"]
            last_arr[idx] = st["last"]
            await asyncio.sleep(0.05)
        qm.shutdown.set()

    watcher = asyncio.create_task(watch())
    await qm.run(
        batch_size=cfg["batch_size"],
        dequeue_timeout=timedelta(seconds=0.5),
        log_aggregation_interval=timedelta(0),
    )
    # run() returns after flushing its completion buffer: every counted job is completed.
    watcher.cancel()
    cpu = _cpu_share(cpu0, t0)
    acked_arr[idx] = st["acked"]
    last_arr[idx] = st["last"]
    with contextlib.suppress(Exception):
        await conn.close()
    return {"role": "consumer", "idx": idx, "error": None, **st, "cpu": cpu, "lat": lat.tobytes()}


# ---------------------------------------------------------------- parent


async def _admin(cfg: dict[str, Any], action: str) -> dict[str, Any]:
    import asyncpg  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)
    from pgqueuer.queries import Queries  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)

    conn = await asyncpg.connect(cfg["url"], timeout=10)
    try:
        q = Queries.from_asyncpg_connection(conn)
        if action == "install":
            await q.install()
            info = {}
            for k in (
                "server_version",
                "synchronous_commit",
                "fsync",
                "wal_sync_method",
                "commit_delay",
            ):
                info[k] = await conn.fetchval(f"SHOW {k}")
            return info
        if action == "count":
            from pgqueuer.domain.settings import db_settings  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)

            s = db_settings()
            return {
                # Identifiers come from pgqueuer's own validated settings.
                "queued": await conn.fetchval(f"SELECT count(*) FROM {s.queue_table}"),  # noqa: S608
                "logged_ok": await conn.fetchval(
                    f"SELECT count(*) FROM {s.queue_table_log} WHERE status = 'successful'"  # noqa: S608
                ),
            }
        await q.uninstall()
        return {}
    finally:
        await conn.close()


def run(cfg: dict[str, Any], result: dict[str, Any], procs: list[Any]) -> None:
    w = cfg["workload"]
    if w == "W4":
        result["notes"].append(
            "unsupported: pgqueuer has no topics or subscriptions (a job is delivered to one "
            "worker), so W4 fan-out cannot be expressed; nothing was run"
        )
        return
    try:
        import pgqueuer  # noqa: PLC0415 (optional bench extra)
    except ImportError as e:
        raise RuntimeError(
            f"pgqueuer is not installed ({e}): pip install 'pgqueuer>=1.6.0' "
            "(securebroker's bench extra)"
        ) from e
    try:
        info = asyncio.run(_admin(cfg, "install"))
    except Exception as e:
        raise RuntimeError(f"cannot install pgqueuer on {cfg['url']} ({e}); {START_HINT}") from e
    installed = True
    try:
        result["notes"].append(
            f"pgqueuer {pgqueuer.__version__} on PostgreSQL {info['server_version']}, "
            f"synchronous_commit={info['synchronous_commit']}, fsync={info['fsync']}, "
            f"wal_sync_method={info['wal_sync_method']}; each enqueue is its own committed "
            f"INSERT (confirmed after WAL fsync), logged tables (durability=durable); "
            "pgqueuer's statement trigger calls pg_notify on every insert, update and delete of "
            "its queue table, and PostgreSQL serializes the commits of notifying transactions "
            "(a database-wide lock held until the commit is flushed), so enqueues, dequeues and "
            "completions do not share fsyncs: about one WAL flush per enqueue"
            + (
                f"; W5 backlog filled with batched enqueues of {cfg['fill_batch']} jobs per "
                "committed INSERT (the fill is not what W5 measures)"
                if w == "W5" and cfg["fill_batch"] > 1
                else ""
            )
            + (
                f"; consumers: QueueManager, batch_size {cfg['batch_size']}, jobs completed "
                "in batches by pgqueuer's status buffer"
                if cfg["consumers"]
                else ""
            )
        )
        ctx = mp.get_context("spawn")
        ready_q, result_q = ctx.Queue(), ctx.Queue()
        go_pub, go_con, stop_con = ctx.Event(), ctx.Event(), ctx.Event()
        deadline = ctx.Value("d", 0.0)
        ncon = cfg["consumers"]
        acked_arr = ctx.Array("d", max(1, ncon), lock=False)
        last_arr = ctx.Array("d", max(1, ncon), lock=False)
        quotas = split(cfg["messages"], cfg["publishers"])
        pub_rate = cfg["rate"] / cfg["publishers"] if w == "W3" and cfg["rate"] > 0 else 0.0
        measure_confirm = w != "W5"
        measure_e2e = w == "W3"

        def start(role: str, idx: int, body: Callable[..., Any], args: tuple[Any, ...]) -> None:
            p = ctx.Process(
                target=client_proc, daemon=True, args=(role, idx, result_q, body, (idx, *args))
            )
            p.start()
            procs.append(p)

        for i, q in enumerate(quotas):
            pub_args = (cfg, q, pub_rate, measure_confirm, ready_q, go_pub, deadline)
            start("publisher", i, _publisher, pub_args)
        con_args = (cfg, measure_e2e, ready_q, go_con, stop_con, acked_arr, last_arr)
        for i in range(ncon):
            start("consumer", i, _consumer, con_args)
        result["client_pids"] = [os.getpid(), *(p.pid for p in procs)]

        results: list[dict[str, Any]] = []

        def raise_if_failed(r: dict[str, Any]) -> None:
            if r.get("error"):
                log(r.get("trace", ""))
                raise RuntimeError(f"{r['role']} {r['idx']} failed: {r['error']}")

        def take(n: int, timeout: float, what: str) -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            end = time.monotonic() + timeout
            while len(got) < n:
                try:
                    r = result_q.get(timeout=max(0.05, min(0.5, end - time.monotonic())))
                except queue_mod.Empty:
                    if time.monotonic() > end:
                        raise TimeoutError(f"timed out waiting for {what}") from None
                    continue
                raise_if_failed(r)
                got.append(r)
            return got

        # Wait until every process has connected (or one failed).
        ready = 0
        end = time.monotonic() + 60
        while ready < len(procs):
            try:
                ready_q.get(timeout=0.2)
                ready += 1
            except queue_mod.Empty:
                with contextlib.suppress(queue_mod.Empty):
                    r = result_q.get_nowait()
                    raise RuntimeError(f"{r['role']} {r['idx']} failed: {r.get('error')}") from None
                if time.monotonic() > end:
                    raise TimeoutError(
                        "timed out waiting for client processes to connect"
                    ) from None
        log(
            f"ready: {cfg['publishers']} publisher proc(s) x {cfg['conns']} conn(s), "
            f"{ncon} consumer proc(s)"
        )

        t0 = now_ms()
        consume_start = t0
        if w == "W3":
            go_con.set()
        deadline.value = now_ms() + cfg["duration_s"] * 1000
        go_pub.set()
        pub = take(len(quotas), cfg["duration_s"] + cfg["drain_timeout_s"] + 30, "publishers")
        results += pub
        p_start = min(r["start"] for r in pub)
        p_end = max(r["end"] for r in pub)
        result["published"] = sum(r["published"] for r in pub)
        result["confirmed"] = sum(r["confirmed"] for r in pub)
        nacked = sum(r["nacked"] for r in pub)
        if nacked:
            errs = sorted({e for r in pub for e in r["errors"]})
            result["notes"].append(f"{nacked} enqueues failed: {'; '.join(errs)}")
        if p_end > p_start:
            result["publish_rate"] = result["confirmed"] / ((p_end - p_start) / 1000)
        if measure_confirm:
            result["confirm_latency_ms"] = percentiles([r["lat"] for r in pub])
        log(f"publish phase: {result['confirmed']} confirmed in {(p_end - p_start) / 1000:.2f} s")

        if ncon:
            if w == "W5":
                consume_start = now_ms()
                go_con.set()
            target = result["confirmed"]
            limit = cfg["duration_s"] if w == "W5" else cfg["drain_timeout_s"]
            cend = time.monotonic() + limit
            while sum(acked_arr[:ncon]) < target and time.monotonic() < cend:
                with contextlib.suppress(queue_mod.Empty):
                    r = result_q.get(timeout=0.02)
                    raise_if_failed(r)
                    raise RuntimeError(f"{r['role']} {r['idx']} ended early")
            if sum(acked_arr[:ncon]) < target:
                result["notes"].append(
                    f"consumers stopped at the time limit with {int(sum(acked_arr[:ncon]))} "
                    f"of {target} acked"
                )
            stop_con.set()
            con = take(ncon, 30, "consumers")
            results += con
            result["delivered"] = sum(r["delivered"] for r in con)
            result["acked"] = sum(r["acked"] for r in con)
            last = max(r["last"] for r in con)
            if last > consume_start:
                result["consume_rate"] = result["acked"] / ((last - consume_start) / 1000)
            if measure_e2e:
                result["e2e_latency_ms"] = percentiles([r["lat"] for r in con])
            result["notes"].append(
                f"consume phase from {'consumer start' if w == 'W5' else 'first publish'} to "
                f"last ack: {(last - consume_start) / 1000:.2f} s"
            )
            counts = asyncio.run(_admin(cfg, "count"))
            if counts["logged_ok"] != result["acked"]:
                result["notes"].append(
                    f"completed jobs in the log table: {counts['logged_ok']} "
                    f"(acked by handlers: {result['acked']})"
                )
        cpus = [f"{round(r['cpu'] * 100)}%" for r in results if r["role"] == "publisher"]
        ccpus = [f"{round(r['cpu'] * 100)}%" for r in results if r["role"] == "consumer"]
        result["notes"].append(
            "client CPU per proc: publishers "
            + "/".join(cpus)
            + (", consumers " + "/".join(ccpus) if ccpus else "")
        )
        run_s = max(0.001, (now_ms() - t0) / 1000)
        used = (
            sum(r["cpu"] for r in results if r["role"] == "publisher")
            * max(0.001, (p_end - p_start) / 1000)
            + sum(r["cpu"] for r in results if r["role"] == "consumer")
            * max(0.001, (now_ms() - consume_start) / 1000)
        ) / run_s
        cores = os.cpu_count() or 1
        if used > 0.4 * cores:
            result["notes"].append(
                f"load generator used ~{used:.1f} of {cores} cores: the client shares the "
                "machine's CPU with PostgreSQL, which bounds these numbers"
            )
        hot = [r for r in results if r["cpu"] > 0.85]
        if hot:
            result["notes"].append(
                f"load generator CPU-bound: {len(hot)} client proc(s) above 85% CPU"
            )
        result["notes"].append(
            f"client: Python {sys.version.split()[0]} asyncpg, {cfg['publishers']} publisher "
            f"proc(s) with {cfg['conns']} connection(s) each (inflight {cfg['inflight']} "
            f"requested), {ncon} consumer proc(s)"
            + (f", offered {cfg['rate']:g} msg/s" if pub_rate else "")
        )
        result["duration_s"] = (now_ms() - t0) / 1000
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        if installed:
            try:
                asyncio.run(_admin(cfg, "uninstall"))
                log("uninstalled the run's pgqueuer schema")
            except Exception as e:  # noqa: BLE001 (cleanup must not hide the result)
                log(f"uninstall failed: {e}")


def main() -> int:
    result: dict[str, Any] = {
        "peer": PEER,
        "workload": None,
        "published": 0,
        "confirmed": 0,
        "delivered": 0,
        "acked": 0,
        "duration_s": 0.0,
        "publish_rate": None,
        "consume_rate": None,
        "confirm_latency_ms": None,
        "e2e_latency_ms": None,
        "client_pids": [os.getpid()],
        "notes": [],
        "error": None,
    }
    procs: list[Any] = []
    try:
        cfg = parse_config(sys.argv[1] if len(sys.argv) > 1 else "{}")
        result["workload"] = cfg["workload"]
        # Before pgqueuer is imported anywhere; spawned children inherit it.
        os.environ["PGQUEUER_PREFIX"] = f"sbb{uuid.uuid4().hex[:10]}_"
        import signal  # noqa: PLC0415 (pgqueuer is the optional bench extra; env is set first)

        def on_alarm(*_: object) -> None:
            raise TimeoutError("run exceeded its time bound")

        def on_term(*_: object) -> None:
            raise SystemExit("interrupted by SIGTERM")

        signal.signal(signal.SIGALRM, on_alarm)
        signal.signal(signal.SIGTERM, on_term)
        signal.alarm(int(cfg["duration_s"] * 2 + cfg["drain_timeout_s"] * 2 + 120))
        run(cfg, result, procs)
        signal.alarm(0)
    except BaseException as e:  # noqa: BLE001 (every failure becomes the JSON error)
        result["error"] = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)
        log("error:", result["error"])
    for k in ("duration_s", "publish_rate", "consume_rate"):
        if result[k] is not None:
            result[k] = round(result[k], 3)
    result["notes"] = "; ".join(result["notes"])
    print(json.dumps(result), flush=True)
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
