"""The orphan cleanup examines a bounded slice of the messages per call, in passes.

It used to look for orphans (message rows no delivery refers to: a racing ack left them, or
their topic had no subscription) among every message older than the grace period, on each call:
100 ms per 200,000 queued messages, every cleanup interval, growing with the backlog.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import PublishRequest
from securebroker.store.postgres import PostgresStore
from tests.conftest import FP_KEY

RETENTION = timedelta(days=7)
GRACE = timedelta(minutes=1)


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    pg = await PostgresStore.connect(pg_dsn, min_size=1, max_size=4)
    try:
        yield pg
    finally:
        await pg.close()


async def _count(store: PostgresStore, table: str) -> int:
    assert table in {"sb_messages", "sb_deliveries"}
    async with store.pool.acquire() as conn:
        n: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
    return n


async def test_cleanup_walks_the_backlog_in_bounded_slices(
    store: PostgresStore, clock: ManualClock
) -> None:
    broker = Broker(store, fingerprint_key=FP_KEY, clock=clock)
    await broker.create_topic("orders")
    await broker.create_subscription("billing", "orders")
    await broker.create_topic("nobody")  # no subscription: its messages are orphans at once
    for i in range(30):  # a backlog: live messages, the oldest
        await broker.publish(PublishRequest(topic="orders", payload=b"%d" % i))
        clock.advance(timedelta(milliseconds=1))
    for i in range(5):
        await broker.publish(PublishRequest(topic="nobody", payload=b"%d" % i))
        clock.advance(timedelta(milliseconds=1))
    clock.advance(GRACE * 2)

    async def cleanup() -> int:
        return (await store.cleanup(clock.now(), RETENTION, GRACE, limit=10)).messages

    # ten messages per call: three calls walk the backlog, the fourth reaches the orphans
    deleted = [await cleanup() for _ in range(4)]
    assert deleted == [0, 0, 0, 5]
    assert await _count(store, "sb_messages") == 30  # the backlog is untouched
    assert await _count(store, "sb_deliveries") == 30

    # the pass ended (fewer than ten examined), so the next one starts over: an orphan left
    # behind among the oldest messages is found again
    async with store.pool.acquire() as conn:
        oldest = await conn.fetchval(
            "DELETE FROM sb_deliveries WHERE seq = (SELECT min(seq) FROM sb_deliveries)"
            " RETURNING message_id"
        )
    assert await cleanup() == 1
    async with store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sb_messages WHERE id = $1", oldest) == 0
    assert await _count(store, "sb_messages") == 29


async def test_cleanup_never_deletes_a_message_within_the_grace_period(
    store: PostgresStore, clock: ManualClock
) -> None:
    broker = Broker(store, fingerprint_key=FP_KEY, clock=clock)
    await broker.create_topic("nobody")
    await broker.publish(PublishRequest(topic="nobody", payload=b"x"))
    clock.advance(GRACE / 2)
    assert (await store.cleanup(clock.now(), RETENTION, GRACE, limit=10)).messages == 0
    clock.advance(GRACE)
    assert (await store.cleanup(clock.now(), RETENTION, GRACE, limit=10)).messages == 1
