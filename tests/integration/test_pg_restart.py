"""What a broker process crash leaves behind (DESIGN §3.1 durable confirm, §3.3 leases).

A child Python process builds its own Broker on PostgreSQL, does one thing (publish, or lease),
reports it on stdout, then blocks on stdin until the test SIGKILLs it: no shutdown code runs, its
connections just vanish. A fresh Broker in the test process then checks what the database kept.

Both processes use a ManualClock: the child starts at the test clock's time (passed on the
command line), so a lease taken in the child expires when the test advances its own clock,
without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import PublishRequest, SettleRef
from securebroker.errors import StaleLease
from securebroker.store.postgres import PostgresStore

FP_KEY = b"test-fingerprint-key-0123456789ab"  # as in conftest
TOPIC, SUB = "payments.authorize", "payments.ledger"
PAYLOAD = b"\x00authorize 12.50 EUR\xff"
#: bound on how long the child may take to start, connect and report (never slept on).
CHILD_REPORT_TIMEOUT = 60.0

CHILD = f"""
import asyncio, sys
from datetime import datetime, timedelta

from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import PublishRequest
from securebroker.store.postgres import PostgresStore


async def main(mode, dsn, start, key_hex):
    store = await PostgresStore.connect(dsn, min_size=1, max_size=1)
    broker = Broker(
        store,
        fingerprint_key=bytes.fromhex(key_hex),
        clock=ManualClock(datetime.fromisoformat(start)),
    )
    if mode == "publish":
        r = await broker.publish(
            PublishRequest({TOPIC!r}, {PAYLOAD!r}, idempotency_key="order-7"), producer="checkout"
        )
        print("published", r.message_id, r.duplicate, flush=True)
    else:
        [d] = await broker.receive({SUB!r}, 1, lease=timedelta(seconds=1), consumer="doomed")
        print("leased", d.message_id, d.lease_token, d.attempt, flush=True)
    sys.stdin.readline()  # hold everything (pool, lease) until killed


asyncio.run(main(*sys.argv[1:]))
"""


@contextlib.asynccontextmanager
async def open_broker(dsn: str, clock: ManualClock) -> AsyncIterator[Broker]:
    """A broker process's start-up: a new pool, nothing cached from before."""
    store = await PostgresStore.connect(dsn, min_size=1, max_size=4)
    try:
        yield Broker(store, fingerprint_key=FP_KEY, clock=clock)
    finally:
        await store.close()


@pytest.fixture
async def topology(pg_dsn: str, clock: ManualClock) -> None:
    async with open_broker(pg_dsn, clock) as b:
        await b.create_topic(TOPIC)
        await b.create_subscription(SUB, TOPIC, max_attempts=5)


async def run_and_kill(tmp_path: Path, mode: str, dsn: str, now: datetime) -> list[str]:
    """Run the child in ``mode``, return its report line split in words, then SIGKILL it."""
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        mode,
        dsn,
        now.isoformat(),
        FP_KEY.hex(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), CHILD_REPORT_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        stdout, stderr = await proc.communicate()
    assert line, f"child exited without reporting: {stderr.decode(errors='replace')}"
    assert proc.returncode == -signal.SIGKILL, stderr.decode(errors="replace")
    assert stdout == b""
    return line.decode().split()


@pytest.mark.usefixtures("topology")
async def test_confirmed_publish_survives_producer_crash(
    pg_dsn: str, clock: ManualClock, tmp_path: Path
) -> None:
    word, mid, duplicate = await run_and_kill(tmp_path, "publish", pg_dsn, clock.now())
    assert (word, duplicate) == ("published", "False")
    message_id = uuid.UUID(mid)

    async with open_broker(pg_dsn, clock) as broker:  # the restarted broker
        [d] = await broker.receive(SUB, 10)
        assert (d.message_id, d.payload, d.attempt) == (message_id, PAYLOAD, 1)
        assert (d.idempotency_key, d.producer) == ("order-7", "checkout")

        # The producer, restarted, retries the publish it never saw confirmed: same id, and
        # no second copy, whether or not the first was consumed yet.
        retry = await broker.publish(
            PublishRequest(TOPIC, PAYLOAD, idempotency_key="order-7"), producer="checkout"
        )
        assert (retry.message_id, retry.duplicate) == (message_id, True)
        await broker.ack(SettleRef(d.subscription, d.message_id, d.lease_token))
        assert await broker.receive(SUB, 10) == []


@pytest.mark.usefixtures("topology")
async def test_lease_of_crashed_consumer_expires_and_message_is_redelivered(
    pg_dsn: str, clock: ManualClock, tmp_path: Path
) -> None:
    async with open_broker(pg_dsn, clock) as broker:
        published = await broker.publish(PublishRequest(TOPIC, PAYLOAD))

        word, mid, token, attempt = await run_and_kill(tmp_path, "lease", pg_dsn, clock.now())
        assert (word, uuid.UUID(mid), attempt) == ("leased", published.message_id, "1")
        assert await broker.receive(SUB, 10) == []  # the dead consumer's lease still holds it

        clock.advance(timedelta(seconds=1, milliseconds=1))  # past the child's 1 s lease
        [d] = await broker.receive(SUB, 10, consumer="survivor")
        assert (d.message_id, d.payload, d.attempt) == (published.message_id, PAYLOAD, 2)
        assert d.lease_token != uuid.UUID(token)
        with pytest.raises(StaleLease):  # the crashed consumer's token is fenced off
            await broker.ack(SettleRef(SUB, published.message_id, uuid.UUID(token)))
        await broker.ack(SettleRef(d.subscription, d.message_id, d.lease_token))
        assert await broker.receive(SUB, 10) == []
