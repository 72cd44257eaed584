"""Group commit keeps every request's own contract while sharing transactions."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg
import pytest

from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import PublishRequest, SettleRef
from securebroker.errors import IdempotencyConflict, StaleLease, Unavailable
from securebroker.store.group import GroupCommitStore
from tests.conftest import FP_KEY, POISON_TRIGGER


@pytest.fixture
async def grouped(
    pg_dsn: str, clock: ManualClock
) -> AsyncIterator[tuple[Broker, GroupCommitStore]]:
    store = await GroupCommitStore.connect_group(pg_dsn, min_size=2, max_size=10, committers=2)
    broker = Broker(store, fingerprint_key=FP_KEY, clock=clock, rng=random.Random(5))
    await broker.create_topic("t")
    await broker.create_subscription("s", "t")
    try:
        yield broker, store
    finally:
        await store.close()


async def test_concurrent_publishes_share_transactions(
    grouped: tuple[Broker, GroupCommitStore], pg_dsn: str
) -> None:
    broker, store = grouped
    results = await asyncio.gather(
        *(broker.publish(PublishRequest("t", b"%d" % i)) for i in range(300))
    )
    assert len({r.message_id for r in results}) == 300
    assert store.stats.transactions < 300  # grouped: fewer commits than requests
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM sb_deliveries") == 300
    finally:
        await conn.close()


async def test_conflict_in_one_request_does_not_fail_its_group(
    grouped: tuple[Broker, GroupCommitStore],
) -> None:
    broker, _ = grouped
    await broker.publish(PublishRequest("t", b"original", idempotency_key="taken"))
    reqs = [PublishRequest("t", b"ok-%d" % i, idempotency_key=f"k{i}") for i in range(50)]
    reqs.insert(25, PublishRequest("t", b"other", idempotency_key="taken"))
    outcomes = await asyncio.gather(*(broker.publish(r) for r in reqs), return_exceptions=True)
    assert isinstance(outcomes[25], IdempotencyConflict)
    ok = [o for i, o in enumerate(outcomes) if i != 25]
    assert all(not isinstance(o, BaseException) and not o.duplicate for o in ok)
    got = await broker.receive("s", 100)
    assert sorted(d.payload for d in got) == sorted(
        [b"original"] + [b"ok-%d" % i for i in range(50)]
    )


async def test_same_key_from_two_requests_in_one_group_is_one_message(
    grouped: tuple[Broker, GroupCommitStore],
) -> None:
    broker, _ = grouped
    req = PublishRequest("t", b"same", idempotency_key="k")
    results = await asyncio.gather(*(broker.publish(req) for _ in range(20)))
    assert len({r.message_id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert len(await broker.receive("s", 100)) == 1


async def test_grouped_acks_report_per_request(grouped: tuple[Broker, GroupCommitStore]) -> None:
    broker, _ = grouped
    await broker.publish_batch([PublishRequest("t", b"%d" % i) for i in range(40)])
    ds = await broker.receive("s", 40)
    refs = [SettleRef(d.subscription, d.message_id, d.lease_token) for d in ds]
    first = await asyncio.gather(*(broker.ack(r) for r in refs))
    assert first == [None] * 40
    again = await asyncio.gather(*(broker.ack(r) for r in refs), return_exceptions=True)
    assert all(isinstance(e, StaleLease) for e in again)
    assert await broker.receive("s", 40) == []


async def test_database_failure_fails_every_request_in_the_group(
    grouped: tuple[Broker, GroupCommitStore], pg_dsn: str
) -> None:
    """A failure inside a shared transaction confirms none of its requests, and stores none."""
    broker, store = grouped
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(POISON_TRIGGER)
        # Hold both committers busy so the next requests queue up and share one transaction.
        blocker = await asyncpg.connect(pg_dsn)
        await blocker.execute("BEGIN; LOCK TABLE sb_messages IN EXCLUSIVE MODE")
        taken = asyncio.Event()
        store.on_take = lambda stats: taken.set()
        first = []
        for _ in range(2):  # one request per committer: both then wait on the lock
            taken.clear()
            first.append(asyncio.ensure_future(broker.publish(PublishRequest("t", b"early"))))
            async with asyncio.timeout(30):
                await taken.wait()
        group = [PublishRequest("t", b"fine-%d" % i) for i in range(10)]
        group.insert(5, PublishRequest("t", b"poison"))
        pending = [asyncio.ensure_future(broker.publish(r)) for r in group]
        await blocker.execute("ROLLBACK")
        await blocker.close()
        await asyncio.gather(*first)
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
        stored = await conn.fetchval(
            "SELECT count(*) FROM sb_messages WHERE payload LIKE 'fine-%'::bytea"
        )
        assert stored == 0
    finally:
        await conn.close()
