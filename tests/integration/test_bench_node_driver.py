"""The benchmark's Node driver of the native protocol (bench/peers/securebroker.mjs) against the
in-process NativeServer: real mutual TLS, real PostgreSQL. Every publish is confirmed and stored
once, every message is delivered and acked once per subscription, and the driver cleans up the
topology it created (and leaves alone the one it was given).

Skipped when node or the drivers' npm packages (``npm ci`` in bench/peers) are missing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from native_fixtures import CLIENT, NativeHarness, make_queue

from securebroker.core.model import SubscriptionCounts

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers"
DRIVER = PEERS / "securebroker.mjs"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (PEERS / "node_modules" / "msgpackr").exists(),
    reason="needs node and `npm ci` in bench/peers",
)


async def run_driver(h: NativeHarness, spec: dict[str, Any], **options: Any) -> dict[str, Any]:
    cert, key = h.tls.pki.clients[CLIENT]
    tls = {"cert": str(cert), "key": str(key), "ca": str(h.tls.pki.ca_cert)}
    full = spec | {
        "url": f"{h.host}:{h.port}",
        "size": 64,
        "duration_s": 30,
        "options": {"tls": tls, "drain_timeout_s": 10} | options,
    }
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(DRIVER),
        json.dumps(full),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    lines = out.decode().strip().splitlines()
    assert lines, err.decode()[-2000:]
    result: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and result["error"] is None, (result, err.decode()[-2000:])
    return result


async def test_work_queue_on_a_topology_the_driver_creates(native: NativeHarness) -> None:
    spec = {"workload": "W3", "messages": 300, "publishers": 2, "consumers": 2, "inflight": 8}
    r = await run_driver(native, spec)
    assert r["peer"] == "securebroker"
    assert (r["published"], r["confirmed"], r["delivered"], r["acked"]) == (300, 300, 300, 300)
    assert r["errors"] == 0
    assert r["confirm_latency_ms"] is not None and r["e2e_latency_ms"] is not None
    assert r["client_cpu_us_per_message"] > 0
    assert len(r["client_pids"]) == 5  # parent, 2 publisher and 2 consumer processes
    assert [t.name for t in await native.broker.list_topics()] == []  # deleted at the end


async def test_fan_out_on_a_topology_it_is_given(native: NativeHarness) -> None:
    topic = "bench.w4"
    subs = [f"{topic}.s{i}" for i in range(3)]
    await make_queue(native, topic, subs[0])
    for s in subs[1:]:
        await native.broker.create_subscription(s, topic)
    spec = {
        "workload": "W4",
        "messages": 120,
        "publishers": 2,
        "consumers": 1,
        "inflight": 16,
        "subscriptions": 3,
    }
    r = await run_driver(native, spec, topic=topic, subscriptions_names=subs)
    assert (r["confirmed"], r["delivered"], r["acked"], r["errors"]) == (120, 360, 360, 0)
    # Each publish carried its own idempotency key, as the SDK's do: 120 claims, one per message.
    async with native.store.pool.acquire() as conn:
        keys = await conn.fetchval("SELECT count(DISTINCT message_id) FROM sb_idempotency")
    assert keys == 120
    for s in subs:  # every message settled: nothing ready, leased or dead-lettered
        assert await native.counts(s) == SubscriptionCounts(), s
    assert [t.name for t in await native.broker.list_topics()] == [topic]  # left in place
