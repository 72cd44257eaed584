"""End to end through the SDK: real TLS on loopback, the real NativeServer, real PostgreSQL.

Time inside the broker is the test's ``ManualClock``: leases expire and backoffs elapse when a test
advances the clock. Every wait is on an event or a reply, bounded by ``IO_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from native_fixtures import (
    ADMIN,
    CLIENT_PRINCIPAL,
    IO_TIMEOUT,
    NativeHarness,
    make_queue,
    new_key,
)

from securebroker.client import Client, Message, OutgoingMessage, Subscription
from securebroker.clock import to_ms
from securebroker.core.model import PublishRequest, PublishResult
from securebroker.errors import (
    AlreadyExists,
    IdempotencyConflict,
    NotFoundError,
    StaleLease,
    SubscriptionNotFound,
    TopicNotFound,
    Unavailable,
    ValidationError,
    from_wire,
)
from securebroker.protocol import frames as f

TOPIC = "orders.created"
SUB = "orders.created.worker"


async def next_message(sub: Subscription) -> Message:
    async with asyncio.timeout(IO_TIMEOUT):
        return await anext(sub)


async def take(sub: Subscription, n: int) -> list[Message]:
    return [await next_message(sub) for _ in range(n)]


async def round_trip(client: Client) -> None:
    """One request answered by the server: everything it sent before has been routed."""
    async with asyncio.timeout(IO_TIMEOUT):
        await client.admin("topic.list")


async def raw_settle(client: Client, frame: f.Ack | f.Nack) -> list[f.SettleResult]:
    reply = await client.request(frame)
    assert isinstance(reply, f.Settled)
    return reply.results


def settle_item(m: Message) -> f.SettleItem:
    return f.SettleItem(
        subscription=m.subscription, message_id=str(m.id), lease_token=m.lease_token
    )


SubmitFn = Callable[..., "asyncio.Future[list[PublishResult]]"]


def gate_publishes(
    h: NativeHarness, hook: Callable[[PublishRequest, PublishResult], Awaitable[None]]
) -> None:
    """Run ``hook`` after each commit and before its confirm is sent (instance-level patch of
    the core's ``submit_publish``, which the native front door calls)."""
    real: SubmitFn = h.broker.submit_publish

    def submit(reqs: list[PublishRequest], **kw: Any) -> asyncio.Future[list[PublishResult]]:
        committed = real(reqs, **kw)

        async def after() -> list[PublishResult]:
            results = await committed
            for req, result in zip(reqs, results, strict=True):
                await hook(req, result)
            return results

        return asyncio.ensure_future(after())

    h.broker.submit_publish = submit  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------


async def test_publish_consume_ack_round_trip(native: NativeHarness) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    assert client.principal == CLIENT_PRINCIPAL
    attributes = {"region": "eu", "kind": "card"}
    trace = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}

    result = await client.publish(
        TOPIC,
        b'{"order": 42}\x00\xff',
        attributes=attributes,
        content_type="application/json",
        idempotency_key="order-42",
        ordering_key="customer-7",
        trace_context=trace,
    )
    assert result.duplicate is False

    sub = client.consume(SUB, credit=5)
    m = await next_message(sub)
    assert m.id == result.message_id
    assert m.payload == b'{"order": 42}\x00\xff'
    assert m.attributes == attributes
    assert m.content_type == "application/json"
    assert m.idempotency_key == "order-42"
    assert m.ordering_key == "customer-7"
    assert m.trace_context == trace
    assert (m.topic, m.subscription, m.attempt) == (TOPIC, SUB, 1)
    assert m.published_at == native.clock.now()

    counts = await native.counts(SUB)
    assert (counts.ready, counts.leased) == (0, 1)
    await m.ack()
    counts = await native.counts(SUB)
    assert (counts.ready, counts.delayed, counts.leased, counts.dead) == (0, 0, 0, 0)

    # Durable: the lease moving past its expiry does not bring the acked message back.
    native.clock.advance(timedelta(hours=1))
    await client.publish(TOPIC, b"after", idempotency_key="after")
    after = await next_message(sub)
    assert after.payload == b"after"
    await after.ack()
    assert sub.queue.empty()


async def test_duplicate_publish_and_conflict(native: NativeHarness) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    first = await client.publish(TOPIC, b"payload", idempotency_key="dup-1")
    again = await client.publish(TOPIC, b"payload", idempotency_key="dup-1")
    assert again == PublishResult(first.message_id, duplicate=True)
    with pytest.raises(IdempotencyConflict):
        await client.publish(TOPIC, b"another payload", idempotency_key="dup-1")
    # The connection stays usable after a rejected request, and only one message exists.
    other = await client.publish(TOPIC, b"payload", idempotency_key="dup-2")
    assert other.message_id != first.message_id
    assert (await native.counts(SUB)).ready == 2
    assert await native.message_count() == 2


async def test_killed_consumer_message_redelivered_to_another_after_lease(
    native: NativeHarness,
) -> None:
    await make_queue(native, TOPIC, SUB)
    producer = await native.connect()
    sent = await producer.publish(TOPIC, b"work", idempotency_key="job-1")

    doomed = await native.connect(reconnect=False)
    first = await next_message(doomed.consume(SUB, credit=1))
    assert (first.id, first.attempt) == (sent.message_id, 1)
    doomed_conn = native.connection_of(doomed)
    # Kill it mid-lease: the TCP connection is torn down without an ack or a CLOSE.
    link = doomed._link
    assert link is not None
    link.writer.transport.abort()
    async with asyncio.timeout(IO_TIMEOUT):
        await doomed_conn.closed.wait()

    survivor = await native.connect(ADMIN)
    sub = survivor.consume(SUB, credit=1)
    # The lease still holds: nothing for the other consumer yet.
    await round_trip(survivor)
    assert sub.queue.empty()
    counts = await native.counts(SUB)
    assert (counts.ready, counts.leased) == (0, 1)

    native.clock.advance(timedelta(seconds=31))  # default lease is 30 s
    second = await next_message(sub)
    assert (second.id, second.attempt, second.payload) == (sent.message_id, 2, b"work")
    assert second.lease_token != first.lease_token

    # The killed consumer's token is stale: rejected, never silently accepted.
    (ack,) = await raw_settle(producer, f.Ack(items=[settle_item(first)]))
    assert not ack.ok and isinstance(from_wire(ack.code, ack.message), StaleLease)
    nack_item = f.NackItem(
        subscription=SUB, message_id=str(first.id), lease_token=first.lease_token, error="late"
    )
    (nack,) = await raw_settle(producer, f.Nack(items=[nack_item]))
    assert not nack.ok and isinstance(from_wire(nack.code, nack.message), StaleLease)
    with pytest.raises(StaleLease):
        await producer.request(
            f.Extend(
                subscription=SUB,
                message_id=str(first.id),
                lease_token=first.lease_token,
                lease_ms=10_000,
            )
        )

    await second.ack()
    counts = await native.counts(SUB)
    assert (counts.ready, counts.leased, counts.dead) == (0, 0, 0)


async def test_pipelined_publishes_all_confirmed(native: NativeHarness) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    n = 500
    async with asyncio.timeout(IO_TIMEOUT * 2):
        results = await asyncio.gather(
            *(client.publish(TOPIC, f"m{i}".encode(), idempotency_key=f"p-{i}") for i in range(n))
        )
    ids = {r.message_id for r in results}
    assert len(ids) == n
    assert not any(r.duplicate for r in results)
    assert (await native.counts(SUB)).ready == n

    sub = client.consume(SUB, credit=n)
    got = await take(sub, n)
    assert {m.id for m in got} == ids
    assert {m.payload for m in got} == {f"m{i}".encode() for i in range(n)}
    acks = await raw_settle(client, f.Ack(items=[settle_item(m) for m in got]))
    assert all(r.ok for r in acks)
    counts = await native.counts(SUB)
    assert (counts.ready, counts.leased) == (0, 0)


async def test_consumer_fills_its_whole_credit_without_any_ack(native: NativeHarness) -> None:
    """Refill batching must never stall a client that waits for its full credit before acking."""
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    sub = client.consume(SUB, credit=10)
    await client.publish_batch(
        [OutgoingMessage(TOPIC, f"a{i}".encode(), idempotency_key=f"a-{i}") for i in range(9)]
    )
    first = await take(sub, 9)
    await client.publish(TOPIC, b"tenth", idempotency_key="a-9")  # one slot free, nothing acked
    [tenth] = await take(sub, 1)
    assert tenth.payload == b"tenth"
    assert len({m.id for m in [*first, tenth]}) == 10


async def test_flow_control_credit_bounds_unacked(native: NativeHarness) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    await client.publish_batch(
        [OutgoingMessage(TOPIC, f"m{i}".encode(), idempotency_key=f"fc-{i}") for i in range(50)]
    )
    credit = 10
    sub = client.consume(SUB, credit=credit)
    seen: set[uuid.UUID] = set()
    extra = 0
    rounds = 0
    while len(seen) < 50 + extra:
        rounds += 1
        assert rounds <= 10
        want = min(credit, 50 + extra - len(seen))
        batch = await take(sub, want)  # nothing acked while these arrive
        if rounds == 1:
            # Give the server every chance to overshoot: a publish wakes its consumer, and an
            # admin round trip proves everything it sent before has been routed here.
            await client.publish(TOPIC, b"one more", idempotency_key="fc-extra")
            extra = 1
        await round_trip(client)
        assert sub.queue.empty(), "more than `credit` deliveries unacked"
        (consumer,) = native.consumers(SUB)
        assert len(consumer.outstanding) == want
        counts = await native.counts(SUB)
        assert counts.leased == want
        assert counts.ready == 50 + extra - len(seen) - want
        seen.update(m.id for m in batch)
        results = await raw_settle(client, f.Ack(items=[settle_item(m) for m in batch]))
        assert all(r.ok for r in results)
    assert len(seen) == 51
    counts = await native.counts(SUB)
    assert (counts.ready, counts.leased) == (0, 0)


async def test_nack_redelivers_and_extend_keeps_lease(native: NativeHarness) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    sent = await client.publish(TOPIC, b"retry me", idempotency_key="n-1")
    sub = client.consume(SUB, credit=1)

    m1 = await next_message(sub)
    await m1.nack("transient failure")
    counts = await native.counts(SUB)
    assert (counts.delayed, counts.leased) == (1, 0)  # backing off
    native.clock.advance(timedelta(seconds=2))  # backoff for attempt 1 is at most 1 s
    m2 = await next_message(sub)
    assert (m2.id, m2.attempt) == (sent.message_id, 2)

    await m2.nack("again, now", delay=timedelta(0))
    m3 = await next_message(sub)
    assert (m3.id, m3.attempt) == (sent.message_id, 3)
    with pytest.raises(StaleLease):
        await m2.ack()  # settled by its nack: that token is spent

    until = await m3.extend(timedelta(minutes=2))
    assert to_ms(until) == to_ms(native.clock.now() + timedelta(minutes=2))
    with pytest.raises(ValidationError):
        await m3.extend(timedelta(milliseconds=10))
    native.clock.advance(timedelta(seconds=90))  # past the default 30 s lease, inside the extension
    await round_trip(client)
    assert sub.queue.empty()
    assert (await native.counts(SUB)).leased == 1
    await m3.ack()
    counts = await native.counts(SUB)
    assert (counts.ready, counts.delayed, counts.leased, counts.dead) == (0, 0, 0, 0)


async def test_batch_publish_is_atomic(native: NativeHarness) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    batch = [OutgoingMessage(TOPIC, f"b{i}".encode(), idempotency_key=f"b-{i}") for i in range(3)]
    results = await client.publish_batch(batch)
    assert len({r.message_id for r in results}) == 3 and not any(r.duplicate for r in results)
    again = await client.publish_batch(batch)
    assert again == [PublishResult(r.message_id, duplicate=True) for r in results]

    with pytest.raises(IdempotencyConflict):
        await client.publish_batch(
            [
                OutgoingMessage(TOPIC, b"fresh", idempotency_key="b-new"),
                OutgoingMessage(TOPIC, b"not b0", idempotency_key="b-0"),
            ]
        )
    assert await native.message_count() == 3
    # "b-new" was rolled back with the conflict: the key is free for any payload.
    fresh = await client.publish(TOPIC, b"something else", idempotency_key="b-new")
    assert fresh.duplicate is False
    assert (await native.counts(SUB)).ready == 4


async def test_admin_operations(native: NativeHarness) -> None:
    admin = await native.connect(ADMIN)
    topic = await admin.admin("topic.create", name="payments.authorize")
    assert topic["name"] == "payments.authorize" and topic["subscriptions"] == []
    with pytest.raises(AlreadyExists):
        await admin.admin("topic.create", name="payments.authorize")
    sub = await admin.admin(
        "subscription.create",
        name="payments.fraud",
        topic="payments.authorize",
        max_attempts=1,
        lease_seconds=5,
    )
    assert sub["topic"] == "payments.authorize" and sub["max_attempts"] == 1
    assert sub["lease_seconds"] == 5.0
    assert [t["name"] for t in await admin.admin("topic.list")] == ["payments.authorize"]
    assert (await admin.admin("topic.get", name="payments.authorize"))["subscriptions"] == [
        "payments.fraud"
    ]
    listed = await admin.admin("subscription.list", topic="payments.authorize")
    assert [s["name"] for s in listed] == ["payments.fraud"]
    described = await admin.admin("subscription.get", name="payments.fraud")
    assert described["counts"] == {"ready": 0, "delayed": 0, "leased": 0, "dead": 0}

    # purge
    for i in range(3):
        await admin.publish("payments.authorize", b"x", idempotency_key=f"purge-{i}")
    assert (await admin.admin("subscription.get", name="payments.fraud"))["counts"]["ready"] == 3
    assert await admin.admin("subscription.purge", name="payments.fraud") == {"purged": 3}
    assert (await admin.admin("subscription.get", name="payments.fraud"))["counts"]["ready"] == 0

    # dead letters: max_attempts=1, so one nack dead-letters the message
    sent = await admin.publish("payments.authorize", b"poison", idempotency_key="poison-1")
    consumer = admin.consume("payments.fraud", credit=1)
    m = await next_message(consumer)
    await m.nack("cannot parse")
    (dead,) = await admin.admin("dlq.list", name="payments.fraud")
    assert dead["message_id"] == str(sent.message_id)
    assert dead["idempotency_key"] == "poison-1"
    assert dead["reason"] == "max_attempts" and dead["last_error"] == "cannot parse"
    assert dead["attempts"] == 1
    assert await admin.admin("dlq.redrive", name="payments.fraud") == {"redriven": 1}
    assert await admin.admin("dlq.list", name="payments.fraud") == []
    again = await next_message(consumer)
    assert again.id == sent.message_id and again.payload == b"poison"
    await again.nack("still broken")
    redriven = await admin.admin(
        "dlq.redrive", name="payments.fraud", message_ids=[str(sent.message_id)]
    )
    assert redriven == {"redriven": 1}
    (m3,) = [await next_message(consumer)]
    await m3.nack("for good")
    assert await admin.admin("dlq.purge", name="payments.fraud") == {"purged": 1}
    await consumer.close()

    # error cases: each is a clear error and the connection stays usable
    with pytest.raises(ValidationError, match="unknown admin operation"):
        await admin.admin("topic.explode", name="payments.authorize")
    with pytest.raises(ValidationError, match="'name'"):
        await admin.admin("topic.create")
    with pytest.raises(ValidationError, match="'topic'"):
        await admin.admin("subscription.create", name="x.y")
    with pytest.raises(ValidationError, match="'max_attempts'"):
        await admin.admin(
            "subscription.create", name="x.y", topic="payments.authorize", max_attempts="3"
        )
    with pytest.raises(ValidationError, match="'message_ids'"):
        await admin.admin("dlq.redrive", name="payments.fraud", message_ids=["not-a-uuid"])
    with pytest.raises(TopicNotFound):
        await admin.admin("topic.get", name="no.such.topic")
    with pytest.raises(TopicNotFound):
        await admin.admin("subscription.create", name="x.y", topic="no.such.topic")
    with pytest.raises(SubscriptionNotFound):
        await admin.admin("subscription.get", name="no.such.sub")
    with pytest.raises(NotFoundError):
        await admin.admin("dlq.list", name="no.such.sub")
    with pytest.raises(NotFoundError):
        await admin.admin("subscription.purge", name="no.such.sub")

    assert await admin.admin("subscription.delete", name="payments.fraud") == {
        "deleted": "payments.fraud"
    }
    assert await admin.admin("topic.delete", name="payments.authorize") == {
        "deleted": "payments.authorize"
    }
    assert await admin.admin("topic.list") == []
    with pytest.raises(TopicNotFound):
        await admin.admin("topic.delete", name="payments.authorize")


async def test_reconnect_resubscribes_and_retried_publish_exists_once(
    native: NativeHarness,
) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    sub = client.consume(SUB, credit=1)
    warmup = await client.publish(TOPIC, b"before", idempotency_key="warmup")
    # Proves the subscription is live; left unacked, it fills the window, so the consumer on the
    # doomed connection cannot lease the next message (it would stay leased to a dead peer).
    m0 = await next_message(sub)
    assert m0.id == warmup.message_id

    key = new_key()
    committed: list[PublishResult] = []
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold_confirm(req: PublishRequest, result: PublishResult) -> None:
        if req.idempotency_key == key and not committed:
            committed.append(result)
            held.set()
            await release.wait()

    gate_publishes(native, hold_confirm)
    old_conn = native.connection_of(client)
    publish = asyncio.ensure_future(client.publish(TOPIC, b"across the drop", idempotency_key=key))
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            await held.wait()  # committed; its confirm is not sent yet
        old_conn.writer.close()  # the server drops the connection: that confirm is lost
        release.set()
        async with asyncio.timeout(IO_TIMEOUT):
            result = await publish
    finally:
        release.set()
        publish.cancel()

    # The SDK reconnected and retried with the same key: the broker answered "duplicate".
    assert result == PublishResult(committed[0].message_id, duplicate=True)
    assert client.reconnects == 1
    assert native.connection_of(client) is not old_conn
    assert await native.message_count() == 2
    # Re-subscribed: the message arrives on the same Subscription, exactly once.
    m = await next_message(sub)
    assert (m.id, m.payload, m.attempt) == (result.message_id, b"across the drop", 1)
    await m.ack()
    # A delivery received before the drop keeps its lease token across the reconnect.
    await m0.ack()
    assert await native.message_count() == 0
    await round_trip(client)
    assert sub.queue.empty()
    counts = await native.counts(SUB)
    assert (counts.ready, counts.leased) == (0, 0)


async def test_graceful_shutdown_keeps_every_confirmed_publish(native: NativeHarness) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect(reconnect=False)
    n, late, hold_from, hold_count = 200, 50, 20, 10
    calls = 0
    held = asyncio.Event()
    release = asyncio.Event()
    held_keys: set[str] = set()

    async def hold_some(req: PublishRequest, result: PublishResult) -> None:
        nonlocal calls
        calls += 1
        if hold_from < calls <= hold_from + hold_count:
            assert req.idempotency_key is not None
            held_keys.add(req.idempotency_key)
            if len(held_keys) == hold_count:
                held.set()
            await release.wait()

    gate_publishes(native, hold_some)
    conn = native.connection_of(client)
    # Instrumentation (events instead of sleeps): when the server stopped reading this
    # connection, and when bytes reached it after that.
    reads_stopped = asyncio.Event()
    late_bytes = asyncio.Event()
    begin_close = conn.begin_close
    feed_data = conn.reader.feed_data

    def observed_begin_close(code: int, reason: str) -> None:
        begin_close(code, reason)
        reads_stopped.set()

    def observed_feed_data(data: bytes) -> None:
        if reads_stopped.is_set():
            late_bytes.set()
        feed_data(data)

    conn.begin_close = observed_begin_close  # type: ignore[method-assign]
    conn.reader.feed_data = observed_feed_data  # type: ignore[method-assign]
    tasks = [
        asyncio.ensure_future(client.publish(TOPIC, f"s{i}".encode(), idempotency_key=f"s-{i}"))
        for i in range(n)
    ]
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            await held.wait()  # ten commits done, their confirms pending
        closing = asyncio.ensure_future(native.server.close(grace=IO_TIMEOUT))
        async with asyncio.timeout(IO_TIMEOUT):
            await reads_stopped.wait()  # CLOSE sent, no more reads on this connection
        # The client keeps sending while the server drains: these are never read, let alone
        # committed, and must not disturb the confirms still owed for the held commits.
        tasks += [
            asyncio.ensure_future(client.publish(TOPIC, f"s{i}".encode(), idempotency_key=f"s-{i}"))
            for i in range(n, n + late)
        ]
        async with asyncio.timeout(IO_TIMEOUT):
            await late_bytes.wait()  # they reached the server while it was closing
        release.set()
        async with asyncio.timeout(IO_TIMEOUT * 2):
            await closing
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        release.set()
        for t in tasks:
            t.cancel()

    confirmed = {
        f"s-{i}": o.message_id for i, o in enumerate(outcomes) if isinstance(o, PublishResult)
    }
    failures = [o for o in outcomes if not isinstance(o, PublishResult)]
    assert all(isinstance(e, Unavailable) for e in failures), failures
    # In-flight commits finished and their confirms went out before the connection closed.
    assert held_keys <= confirmed.keys()
    # What was sent after the close began was never read, so never committed or confirmed.
    assert not confirmed.keys() & {f"s-{i}" for i in range(n, n + late)}
    async with native.store.pool.acquire() as conn:
        stored = {r["id"] for r in await conn.fetch("SELECT id FROM sb_messages")}
    assert set(confirmed.values()) <= stored
    # The client was told, and does not hang.
    with pytest.raises(Unavailable):
        async with asyncio.timeout(IO_TIMEOUT):
            await client.publish(TOPIC, b"too late", idempotency_key="late")
