"""The delivery contract under real concurrency, against PostgreSQL (DESIGN §3).

``tests/contract`` proves the single-connection semantics. Here many tasks share one broker
whose pool holds 30 connections, so publishers and consumers truly race inside PostgreSQL:
row locks, ``SKIP LOCKED``, the idempotency constraint and the ordering-key advisory lock are
what keep the promises, not the event loop.

No test sleeps or measures time. Every consumer loop is bounded: it fails after a fixed number
of receives that returned nothing, or a fixed total number of receives.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import (
    Delivery,
    NackRef,
    PublishRequest,
    PublishResult,
    SettleRef,
    SubscriptionCounts,
)
from securebroker.errors import IdempotencyConflict
from securebroker.store.postgres import PostgresStore
from securebroker.store.sql import QUERIES as Q

FP_KEY = b"test-fingerprint-key-0123456789ab"  # as in conftest

#: a consumer gives up (and the test fails) after this many receives in a row found nothing...
MAX_EMPTY_POLLS = 2000
#: ...or after this many receives in all.
MAX_POLLS = 5000


def ref(d: Delivery) -> SettleRef:
    return SettleRef(d.subscription, d.message_id, d.lease_token)


def pg_store(broker: Broker) -> PostgresStore:
    store = broker.store
    assert isinstance(store, PostgresStore)
    return store


async def table_count(broker: Broker, table: str) -> int:
    assert table in {"sb_messages", "sb_deliveries", "sb_idempotency"}
    async with pg_store(broker).pool.acquire() as conn:
        n: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
    return n


async def assert_drained(broker: Broker, subscription: str) -> None:
    info = await broker.get_subscription(subscription)
    assert info.counts == SubscriptionCounts(ready=0, delayed=0, leased=0, dead=0)


async def run_all(*workers: Coroutine[Any, Any, None]) -> None:
    """Run workers concurrently; the first failure cancels the rest (no stray tasks)."""
    async with asyncio.TaskGroup() as tg:
        for w in workers:
            tg.create_task(w)


async def consume_until(
    broker: Broker,
    subscription: str,
    name: str,
    max_messages: int,
    done: Callable[[], bool],
    handle: Callable[[str, list[Delivery]], Awaitable[None]],
) -> None:
    """Receive and hand each batch to ``handle`` until ``done()``; bounded, fails if stuck."""
    empty = 0
    for _ in range(MAX_POLLS):
        if done():
            return
        batch = await broker.receive(subscription, max_messages, consumer=name)
        if not batch:
            empty += 1
            if empty > MAX_EMPTY_POLLS:
                pytest.fail(f"{name}: {empty} empty receives in a row on {subscription}")
            continue
        empty = 0
        await handle(name, batch)
    if not done():
        pytest.fail(f"{name}: gave up after {MAX_POLLS} receives on {subscription}")


# -- competing consumers -------------------------------------------------------------------
async def test_competing_consumers_each_message_held_once_and_acked_once(
    pg_broker: Broker,
) -> None:
    total, consumers = 400, 8
    await pg_broker.create_topic("orders.created")
    await pg_broker.create_subscription("fulfilment", "orders.created")

    published: set[uuid.UUID] = set()
    held: dict[uuid.UUID, str] = {}  # message id -> consumer currently holding its lease
    acked: Counter[uuid.UUID] = Counter()
    ack_errors: list[BaseException] = []

    async def publisher() -> None:
        for start in range(0, total, 25):
            batch = [
                PublishRequest("orders.created", f"order-{i}".encode())
                for i in range(start, start + 25)
            ]
            results = await pg_broker.publish_batch(batch, producer="orders-svc")
            published.update(r.message_id for r in results)

    async def handle(name: str, batch: list[Delivery]) -> None:
        for d in batch:
            holder = held.get(d.message_id)
            assert holder is None, f"{d.message_id} leased to {name} while {holder} holds it"
            held[d.message_id] = name
        for d in batch:
            try:
                await pg_broker.ack(ref(d))
            except Exception as exc:  # recorded, so the test reports every failed ack
                ack_errors.append(exc)
            else:
                acked[d.message_id] += 1
            del held[d.message_id]

    await run_all(
        publisher(),
        *(
            consume_until(
                pg_broker,
                "fulfilment",
                f"c{n}",
                10,
                lambda: sum(acked.values()) + len(ack_errors) >= total,
                handle,
            )
            for n in range(consumers)
        ),
    )

    assert ack_errors == []
    assert len(published) == total
    assert set(acked) == published
    assert all(n == 1 for n in acked.values())
    assert held == {}
    await assert_drained(pg_broker, "fulfilment")
    # An acked message is deleted together with its last delivery.
    assert await table_count(pg_broker, "sb_deliveries") == 0
    assert await table_count(pg_broker, "sb_messages") == 0


# -- concurrent idempotent publish ---------------------------------------------------------
async def test_concurrent_duplicates_resolve_to_one_message(pg_broker: Broker) -> None:
    await pg_broker.create_topic("payments.authorize")
    await pg_broker.create_subscription("ledger", "payments.authorize")
    req = PublishRequest("payments.authorize", b"charge 10 EUR", idempotency_key="pay-42")

    results = await asyncio.gather(
        *(pg_broker.publish(req, producer="checkout") for _ in range(50))
    )

    assert sum(not r.duplicate for r in results) == 1
    assert len({r.message_id for r in results}) == 1
    assert await table_count(pg_broker, "sb_messages") == 1
    assert await table_count(pg_broker, "sb_deliveries") == 1
    assert await table_count(pg_broker, "sb_idempotency") == 1
    [d] = await pg_broker.receive("ledger", 10)
    assert d.message_id == results[0].message_id
    assert d.payload == b"charge 10 EUR"


async def test_concurrent_same_key_different_payloads_first_commit_wins(
    pg_broker: Broker,
) -> None:
    await pg_broker.create_topic("payments.authorize")
    await pg_broker.create_subscription("ledger", "payments.authorize")
    payloads = [b"charge 10 EUR" if i % 2 == 0 else b"charge 99 EUR" for i in range(50)]

    outcomes = await asyncio.gather(
        *(
            pg_broker.publish(
                PublishRequest("payments.authorize", p, idempotency_key="pay-42"),
                producer="checkout",
            )
            for p in payloads
        ),
        return_exceptions=True,
    )

    winners = [
        (p, o)
        for p, o in zip(payloads, outcomes, strict=True)
        if isinstance(o, PublishResult) and not o.duplicate
    ]
    assert len(winners) == 1
    won_payload, won = winners[0]
    for p, o in zip(payloads, outcomes, strict=True):
        if p == won_payload:
            assert isinstance(o, PublishResult), o
            assert o.message_id == won.message_id
        else:
            assert isinstance(o, IdempotencyConflict), o
    assert await table_count(pg_broker, "sb_messages") == 1
    assert await table_count(pg_broker, "sb_deliveries") == 1
    [d] = await pg_broker.receive("ledger", 10)
    assert (d.message_id, d.payload) == (won.message_id, won_payload)


# -- ordering keys -------------------------------------------------------------------------
class KeyTracker:
    """Checks one delivery in flight per ordering key; logs each key's deliveries in order.

    A key is released just *before* its ack or nack is sent: once the settle commits, the
    broker may rightly hand the key's next delivery to another consumer before this task has
    resumed. So "held" spans receipt to settle request, the narrowest window that is sound.
    Because a key has at most one delivery in flight (checked on every receipt), the order in
    which its deliveries are received is a total order, and the log records outcomes in it.
    """

    def __init__(self) -> None:
        self.holder: dict[str, str] = {}  # ordering key -> consumer holding its delivery
        self.log: dict[str, list[list[str]]] = defaultdict(list)  # key -> [[payload, outcome]]
        self.acked = 0

    def take(self, name: str, d: Delivery) -> list[str]:
        key = d.ordering_key
        assert key is not None
        other = self.holder.get(key)
        assert other is None, f"{name} got {d.payload!r} of {key} while {other} holds {key}"
        self.holder[key] = name
        entry = [d.payload.decode(), "held"]
        self.log[key].append(entry)
        return entry

    def release(self, d: Delivery) -> None:
        assert d.ordering_key is not None
        del self.holder[d.ordering_key]

    def acked_sequence(self, key: str) -> list[str]:
        return [p for p, outcome in self.log[key] if outcome == "acked"]


async def test_ordering_keys_with_competing_consumers_and_redelivery(pg_broker: Broker) -> None:
    keys = [f"account-{k}" for k in range(5)]
    per_key, consumers = 30, 4
    await pg_broker.create_topic("ledger.postings")
    await pg_broker.create_subscription("ledger", "ledger.postings")

    interleaved = [
        PublishRequest("ledger.postings", f"{k}:{i}".encode(), ordering_key=k)
        for i in range(per_key)
        for k in keys
    ]
    for start in range(0, len(interleaved), 20):
        await pg_broker.publish_batch(interleaved[start : start + 20], producer="ledger-svc")

    tracker = KeyTracker()
    deliveries = 0

    async def handle(name: str, batch: list[Delivery]) -> None:
        nonlocal deliveries
        entries = [tracker.take(name, d) for d in batch]
        for d, entry in zip(batch, entries, strict=True):
            deliveries += 1
            tracker.release(d)
            if d.attempt == 1 and deliveries % 7 == 0:  # deterministic redelivery, once each
                await pg_broker.nack(
                    NackRef(d.subscription, d.message_id, d.lease_token, "retry", timedelta(0))
                )
                entry[1] = "nacked"
            else:
                await pg_broker.ack(ref(d))
                entry[1] = "acked"
                tracker.acked += 1

    await run_all(
        *(
            consume_until(
                pg_broker, "ledger", f"c{n}", 5, lambda: tracker.acked >= len(interleaved), handle
            )
            for n in range(consumers)
        )
    )

    assert any(o == "nacked" for log in tracker.log.values() for _, o in log)
    for k in keys:
        assert tracker.acked_sequence(k) == [f"{k}:{i}" for i in range(per_key)], k
    assert tracker.holder == {}
    await assert_drained(pg_broker, "ledger")


async def test_racing_publishers_on_one_ordering_key(pg_broker: Broker) -> None:
    producers, per_producer, consumers = 10, 10, 3
    total = producers * per_producer
    await pg_broker.create_topic("orders.events")
    await pg_broker.create_subscription("shipping", "orders.events")
    tracker = KeyTracker()

    async def producer(task: int) -> None:
        for i in range(per_producer):
            await pg_broker.publish(
                PublishRequest("orders.events", f"{task}-{i}".encode(), ordering_key="K"),
                producer=f"p{task}",
            )

    async def handle(name: str, batch: list[Delivery]) -> None:
        entries = [tracker.take(name, d) for d in batch]  # fails on a second "K" in flight
        for d, entry in zip(batch, entries, strict=True):
            tracker.release(d)
            await pg_broker.ack(ref(d))
            entry[1] = "acked"
            tracker.acked += 1

    await run_all(
        *(producer(t) for t in range(producers)),
        *(
            consume_until(pg_broker, "shipping", f"c{n}", 5, lambda: tracker.acked >= total, handle)
            for n in range(consumers)
        ),
    )

    acked = tracker.acked_sequence("K")
    assert sorted(acked) == sorted(
        f"{t}-{i}" for t in range(producers) for i in range(per_producer)
    )
    for t in range(producers):
        mine = [p for p in acked if p.startswith(f"{t}-")]
        assert mine == [f"{t}-{i}" for i in range(per_producer)], f"producer {t}: {mine}"
    await assert_drained(pg_broker, "shipping")


async def test_ordering_key_follows_commit_order_across_broker_processes(
    pg_dsn: str, pg_broker: Broker, clock: ManualClock
) -> None:
    """Two brokers sharing one database (DESIGN §6) publish to one ordering key in turn.

    Deterministic: each broker has a single connection, so the publishes come from two
    PostgreSQL sessions, one after the other. "second" is published after "first" committed,
    so it must wait until "first" is settled (one in flight per key, in publish order).
    """
    await pg_broker.create_topic("orders.events")
    await pg_broker.create_subscription("shipping", "orders.events")
    one, two = [
        Broker(
            await PostgresStore.connect(pg_dsn, min_size=1, max_size=1),
            fingerprint_key=FP_KEY,
            clock=clock,
        )
        for _ in range(2)
    ]
    try:
        # Broker one's session draws sequence numbers first; broker two's come after them.
        await one.publish(PublishRequest("orders.events", b"warm-up"))
        await two.publish(PublishRequest("orders.events", b"first", ordering_key="K"))
        held = {d.payload: d for d in await pg_broker.receive("shipping", 10)}
        assert set(held) == {b"warm-up", b"first"}
        await pg_broker.ack(ref(held[b"warm-up"]))
        # Published after "first" was committed (and while it is held by a consumer).
        await one.publish(PublishRequest("orders.events", b"second", ordering_key="K"))
        early = [d.payload for d in await pg_broker.receive("shipping", 10)]
        assert early == [], f"{early} delivered while b'first' of the same key is in flight"
        await pg_broker.ack(ref(held[b"first"]))
        [d] = await pg_broker.receive("shipping", 10)
        assert d.payload == b"second"
    finally:
        await pg_store(one).close()
        await pg_store(two).close()


# -- fan-out -------------------------------------------------------------------------------
async def test_concurrent_fan_out_every_subscription_acks_every_message_once(
    pg_broker: Broker, clock: ManualClock
) -> None:
    subs, total, per_sub = ("fraud", "ledger", "analytics"), 200, 2
    await pg_broker.create_topic("payments.settled")
    for s in subs:
        await pg_broker.create_subscription(s, "payments.settled")

    published: set[uuid.UUID] = set()
    acked: dict[str, Counter[uuid.UUID]] = {s: Counter() for s in subs}

    async def publisher() -> None:
        for start in range(0, total, 20):
            results = await pg_broker.publish_batch(
                [
                    PublishRequest("payments.settled", f"p{i}".encode())
                    for i in range(start, start + 20)
                ]
            )
            published.update(r.message_id for r in results)

    def handler(sub: str) -> Callable[[str, list[Delivery]], Awaitable[None]]:
        async def handle(name: str, batch: list[Delivery]) -> None:
            for d in batch:
                assert d.subscription == sub
                await pg_broker.ack(ref(d))
                acked[sub][d.message_id] += 1

        return handle

    await run_all(
        publisher(),
        *(
            consume_until(
                pg_broker,
                s,
                f"{s}-{n}",
                10,
                lambda s=s: sum(acked[s].values()) >= total,
                handler(s),
            )
            for s in subs
            for n in range(per_sub)
        ),
    )

    for s in subs:
        assert set(acked[s]) == published, s
        assert all(n == 1 for n in acked[s].values()), s
        await assert_drained(pg_broker, s)
    assert await table_count(pg_broker, "sb_deliveries") == 0
    # Acks of one message racing in several subscriptions may each see the other's delivery
    # and leave the message row behind; the janitor removes such rows after the grace period.
    clock.advance(pg_broker.settings.settled_grace * 2)
    await pg_broker.cleanup()
    assert await table_count(pg_broker, "sb_messages") == 0


class _CleanupBetween:
    """A connection whose read-back of conflicting claims is preceded by the cleanup deleting
    every claim, committed on another connection: the interleaving of an expired claim that
    the maintenance task deletes between a publish's claim and its read-back."""

    def __init__(self, conn: Any, cleaner: Any) -> None:
        self._conn = conn
        self._cleaner = cleaner
        self.deleted = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetch(self, query: str, *args: Any) -> Any:
        if query == Q["idem_existing"] and not self.deleted:
            self.deleted = int(
                (await self._cleaner.execute("DELETE FROM sb_idempotency")).split()[-1]
            )
        return await self._conn.fetch(query, *args)


async def test_an_expired_claim_deleted_between_claim_and_read_back_is_claimed_again(
    pg_broker: Broker, pg_dsn: str, clock: ManualClock
) -> None:
    """Reusing a key whose claim has expired races the cleanup that deletes it: the claim
    conflicts, and is gone when read back. The publish claims it again and goes through,
    where it used to fail with an internal error."""
    await pg_broker.create_topic("payments.capture")
    await pg_broker.create_subscription("ledger", "payments.capture")
    first = await pg_broker.publish(
        PublishRequest("payments.capture", b"capture 1", idempotency_key="cap-7"), producer="p"
    )
    clock.advance(timedelta(days=8))  # past the 7 days of retention
    later = pg_broker.prepare(
        PublishRequest("payments.capture", b"capture 2", idempotency_key="cap-7"),
        producer="p",
        scope=None,
        now=clock.now(),
    )
    store = pg_store(pg_broker)
    conn = await asyncpg.connect(pg_dsn)
    cleaner = await asyncpg.connect(pg_dsn)
    try:
        proxy = _CleanupBetween(conn, cleaner)
        async with conn.transaction():
            [result] = await store.publish_in(proxy, [later], timedelta(days=7))  # type: ignore[arg-type]
    finally:
        await conn.close()
        await cleaner.close()
    assert proxy.deleted == 1  # the interleaving happened
    assert result.message_id == later.id != first.message_id
    assert not result.duplicate
    async with store.pool.acquire() as c:
        assert await c.fetchval("SELECT message_id FROM sb_idempotency") == later.id
    assert await table_count(pg_broker, "sb_messages") == 2
