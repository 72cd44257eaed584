"""The producer outbox end to end (DESIGN §3.7, docs/outbox.md).

The producer's own database is a second database on the embedded server (``producer_dsn``);
the broker is a real ``NativeServer`` over mutual TLS on the test's broker database. Relays are
driven pass by pass with ``relay_once()`` where the test needs to see each step, and run as
tasks (``run(stop)``) where concurrency is the point. Backoff is checked against a
``ManualClock`` given to the relay; every wait is on an event or a reply, bounded by
``IO_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner
from native_fixtures import (
    CLIENT,
    IO_TIMEOUT,
    NativeFactory,
    NativeHarness,
    make_queue,
)
from opentelemetry.sdk.trace import TracerProvider

from securebroker.cli import main
from securebroker.client import Client, Message
from securebroker.clock import ManualClock
from securebroker.core.model import PublishResult
from securebroker.errors import ValidationError
from securebroker.outbox import (
    OutboxRelay,
    RelayStats,
    backoff_delay,
    enqueue,
    install,
    installed,
    purge_sent,
)
from securebroker.outbox.relay import OutboxRow, Outcome
from securebroker.outbox.table import Conn
from securebroker.protocol import frames as f

TOPIC = "orders.created"
SUB = "orders.created.ledger"
OTHER_TOPIC = "orders.shipped"
OTHER_SUB = "orders.shipped.ledger"


# -- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture
def producer_dsn(empty_dsn: str) -> str:
    """The producer service's OWN database: a second, empty database on the embedded server
    (not the broker's)."""
    return empty_dsn


@pytest.fixture
async def producer(producer_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the producer's database with the outbox installed and a business table."""
    pool = await asyncpg.create_pool(producer_dsn, min_size=1, max_size=8)
    try:
        async with pool.acquire() as conn:
            await install(conn)
            await conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, total bigint NOT NULL)")
        yield pool
    finally:
        await pool.close()


async def outbox_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return list(await conn.fetch("SELECT * FROM sb_outbox ORDER BY id"))


async def enqueue_each(
    pool: asyncpg.Pool, items: Sequence[tuple[str, bytes, str | None]]
) -> list[str]:
    """Enqueue ``(topic, payload, ordering_key)`` items, each in its own transaction."""
    keys = []
    for topic, payload, ordering_key in items:
        async with pool.acquire() as conn, conn.transaction():
            keys.append(await enqueue(conn, topic, payload, ordering_key=ordering_key))
    return keys


async def drain(client: Client, subscription: str, n: int) -> list[Message]:
    """Consume and ack ``n`` messages (acking each lets the broker hand out the next of its
    ordering key)."""
    sub = client.consume(subscription, credit=max(n, 1))
    out: list[Message] = []
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            while len(out) < n:
                m = await anext(sub)
                await m.ack()
                out.append(m)
    finally:
        await sub.close()
    return out


def by_ordering_key(messages: Sequence[Message]) -> dict[str | None, list[bytes]]:
    out: dict[str | None, list[bytes]] = {}
    for m in messages:
        out.setdefault(m.ordering_key, []).append(m.payload)
    return out


async def run_cli(*args: str) -> Any:
    """The real CLI in a thread (it runs its own event loop; the broker keeps running here)."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


def cli_args(h: NativeHarness, name: str = CLIENT, *, port: int | None = None) -> list[str]:
    cert, key = h.tls.pki.clients[name]
    return [
        "--host",
        h.host,
        "--port",
        str(h.port if port is None else port),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--ca",
        str(h.tls.pki.ca_cert),
    ]


class Abort(Exception):
    """The business transaction fails after writing its order and outbox row."""


async def place_order(pool: asyncpg.Pool, order_id: int, *, fail: bool) -> str:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO orders VALUES ($1, 100)", order_id)
        key = await enqueue(conn, TOPIC, f"order {order_id}".encode(), key=f"order-{order_id}")
        if fail:
            raise Abort
    return key


class GatedRelay(OutboxRelay):
    """A replica that stops after claiming its rows (holding their locks) until released."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claimed = asyncio.Event()
        self.release = asyncio.Event()
        self.claimed_ids: list[int] = []

    async def _publish(self, rows: Sequence[OutboxRow]) -> list[Outcome]:
        self.claimed_ids = [r.id for r in rows]
        self.claimed.set()
        await self.release.wait()
        return await super()._publish(rows)


class KilledBeforeCommit(OutboxRelay):
    """A relay that hangs after the broker confirmed its pass and before it records it, so the
    test can kill it (cancel its task) between the broker's confirm and its own commit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.confirmed = asyncio.Event()
        self.outcomes: list[Outcome] = []

    async def _record(self, conn: Conn, outcomes: Sequence[Outcome]) -> None:
        self.outcomes = list(outcomes)
        self.confirmed.set()
        await asyncio.Event().wait()  # until killed


# -- install and enqueue --------------------------------------------------------------------------
async def test_install_is_idempotent_even_from_several_places_at_once(producer_dsn: str) -> None:
    conns = [await asyncpg.connect(producer_dsn) for _ in range(3)]
    try:
        assert not await installed(conns[0])
        await asyncio.gather(*(install(c) for c in conns))
        await install(conns[0])
        assert await installed(conns[0])
        columns = {
            r["column_name"]
            for r in await conns[0].fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'sb_outbox'"
            )
        }
    finally:
        for c in conns:
            await c.close()
    assert columns == {
        "id",
        "key",
        "topic",
        "payload",
        "attributes",
        "content_type",
        "ordering_key",
        "trace_context",
        "created_at",
        "attempts",
        "next_attempt_at",
        "sent_at",
        "message_id",
        "last_error",
    }


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"topic": "not a topic"}, "topic"),
        ({"key": "k" * 256}, "idempotency_key"),
        ({"ordering_key": "o" * 256}, "ordering_key"),
        ({"payload": b"x" * (f.MAX_PAYLOAD + 1)}, "payload"),
        ({"attributes": {f"a{i}": "v" for i in range(f.MAX_ATTRIBUTES + 1)}}, "attributes"),
    ],
)
async def test_enqueue_refuses_what_the_broker_could_never_accept(
    producer: asyncpg.Pool, kwargs: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {"topic": TOPIC, "payload": b"ok"} | kwargs
    async with producer.acquire() as conn:
        with pytest.raises(ValidationError) as exc:
            await enqueue(conn, **args)
    assert field in str(exc.value)
    assert "not a topic" not in str(exc.value)  # names the field, never echoes the value
    assert await outbox_rows(producer) == []


async def test_a_key_already_in_the_outbox_aborts_the_callers_transaction(
    producer: asyncpg.Pool,
) -> None:
    await place_order(producer, 1, fail=False)
    async with producer.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await enqueue(conn, TOPIC, b"again", key="order-1")
    assert len(await outbox_rows(producer)) == 1


# -- publishing ----------------------------------------------------------------------------------
async def test_rolled_back_enqueue_is_never_published(
    native: NativeHarness, producer: asyncpg.Pool
) -> None:
    await make_queue(native, TOPIC, SUB)
    relay = OutboxRelay(producer, await native.connect())
    with pytest.raises(Abort):
        await place_order(producer, 1, fail=True)
    assert await relay.relay_once() == 0
    assert await outbox_rows(producer) == []
    assert await native.message_count() == 0
    assert relay.stats == RelayStats()


async def test_committed_rows_are_published_once_with_their_keys(
    native: NativeHarness, producer: asyncpg.Pool
) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    relay = OutboxRelay(producer, client)
    async with producer.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO orders VALUES (7, 4200)")
        k1 = await enqueue(
            conn,
            TOPIC,
            b'{"order": 7}',
            key="order-7",
            attributes={"region": "eu"},
            content_type="application/json",
        )
        k2 = await enqueue(conn, TOPIC, b"second")
        k3 = await enqueue(conn, TOPIC, b"third", ordering_key="customer-9")
    assert k1 == "order-7"
    assert uuid.UUID(k2).version == 7 and uuid.UUID(k3).version == 7

    assert await relay.relay_once() == 3
    assert await relay.relay_once() == 0
    assert relay.stats == RelayStats(sent=3)
    assert await native.message_count() == 3

    rows = await outbox_rows(producer)
    assert all(r["sent_at"] is not None and r["message_id"] is not None for r in rows)
    assert [(r["attempts"], r["last_error"]) for r in rows] == [(1, None)] * 3

    messages = {m.idempotency_key: m for m in await drain(client, SUB, 3)}
    assert set(messages) == {k1, k2, k3}
    for r in rows:
        m = messages[r["key"]]
        assert m.id == r["message_id"] and m.payload == r["payload"]
    assert messages[k1].attributes == {"region": "eu"}
    assert messages[k1].content_type == "application/json"
    assert messages[k3].ordering_key == "customer-9"
    assert messages[k2].ordering_key is None

    # the broker holds the row key as the message's idempotency key: a retry is a duplicate
    again = await client.publish(
        TOPIC,
        b'{"order": 7}',
        idempotency_key=k1,
        attributes={"region": "eu"},
        content_type="application/json",
    )
    assert again == PublishResult(messages[k1].id, duplicate=True)
    counts = await native.counts(SUB)
    assert counts.ready == counts.leased == 0


async def test_enqueue_carries_the_current_trace_context(
    native: NativeHarness, producer: asyncpg.Pool
) -> None:
    await make_queue(native, TOPIC, SUB)
    tracer = TracerProvider().get_tracer("checkout")
    given = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    async with producer.acquire() as conn:
        with tracer.start_as_current_span("place order") as span:
            traced = await enqueue(conn, TOPIC, b"traced")
            explicit = await enqueue(conn, TOPIC, b"explicit", trace_context=given)
        untraced = await enqueue(conn, TOPIC, b"untraced")
    ctx = span.get_span_context()
    expected = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    rows = {r["key"]: r for r in await outbox_rows(producer)}
    async with producer.acquire() as conn:
        stored = {
            r["key"]: r["tc"]
            for r in await conn.fetch("SELECT key, trace_context::text AS tc FROM sb_outbox")
        }
    assert len(rows) == 3
    assert stored[traced] == f'{{"traceparent": "{expected}"}}'
    assert stored[explicit] == f'{{"traceparent": "{given["traceparent"]}"}}'
    assert stored[untraced] == "{}"

    client = await native.connect()
    assert await OutboxRelay(producer, client).relay_once() == 3
    messages = {m.idempotency_key: m for m in await drain(client, SUB, 3)}
    assert messages[traced].trace_context["traceparent"] == expected
    assert messages[explicit].trace_context["traceparent"] == given["traceparent"]


# -- replicas and ordering -------------------------------------------------------------------------
async def test_a_replica_never_overtakes_a_row_another_replica_holds(
    native: NativeHarness, producer: asyncpg.Pool
) -> None:
    """Replica A holds row 1 of key K (locked, publishing). Replica B's SKIP LOCKED claim skips
    row 1, but must still see it as an earlier unsent row of K: B publishes the other keys and
    leaves K's later rows alone until A has committed."""
    await make_queue(native, TOPIC, SUB)
    await make_queue(native, OTHER_TOPIC, OTHER_SUB)
    await enqueue_each(
        producer,
        [
            (TOPIC, b"K1", "K"),
            (TOPIC, b"K2", "K"),
            (TOPIC, b"free", None),
            (TOPIC, b"L1", "L"),
            (TOPIC, b"K3", "K"),
            (OTHER_TOPIC, b"other-K1", "K"),  # same key, other topic: independent
        ],
    )
    a = GatedRelay(producer, await native.connect(), batch=1)
    b = OutboxRelay(producer, await native.connect(), batch=10)
    task = asyncio.create_task(a.relay_once())
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            await a.claimed.wait()
        rows = await outbox_rows(producer)
        assert a.claimed_ids == [rows[0]["id"]]

        assert await b.relay_once() == 3  # free, L1, other-K1; not K2 or K3
        sent = {bytes(r["payload"]) for r in await outbox_rows(producer) if r["sent_at"]}
        assert sent == {b"free", b"L1", b"other-K1"}
        assert await native.message_count() == 3
    finally:
        a.release.set()
        async with asyncio.timeout(IO_TIMEOUT):
            assert await task == 1

    assert await b.relay_once() == 2  # K2 then K3, now that K1 is sent
    assert await native.message_count() == 6
    assert all(r["attempts"] == 1 for r in await outbox_rows(producer))
    assert a.stats.duplicates == b.stats.duplicates == 0

    consumer = await native.connect()
    got = by_ordering_key(await drain(consumer, SUB, 5))
    assert got == {"K": [b"K1", b"K2", b"K3"], "L": [b"L1"], None: [b"free"]}


async def test_two_relays_at_once_keep_each_keys_order_and_send_each_row_once(
    native: NativeHarness, producer: asyncpg.Pool
) -> None:
    await make_queue(native, TOPIC, SUB)
    keys = ["a", "b", "c", "d"]
    per_key = 12
    items: list[tuple[str, bytes, str | None]] = []
    for i in range(per_key):
        for k in keys:  # interleaved: a0 b0 c0 d0 a1 b1 ...
            items.append((TOPIC, f"{k}:{i:02d}".encode(), k))
        if i % 3 == 0:
            items.append((TOPIC, f"free:{i:02d}".encode(), None))
    async with producer.acquire() as conn, conn.transaction():
        for topic, payload, ordering_key in items[: len(items) // 2]:
            await enqueue(conn, topic, payload, ordering_key=ordering_key)
    await enqueue_each(producer, items[len(items) // 2 :])

    relays = [OutboxRelay(producer, await native.connect(), batch=5, poll=0.01) for _ in range(2)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in relays]
    try:
        messages = await drain(await native.connect(), SUB, len(items))
    finally:
        stop.set()
        async with asyncio.timeout(IO_TIMEOUT):
            await asyncio.gather(*tasks)

    got = by_ordering_key(messages)
    for k in keys:
        assert got[k] == [f"{k}:{i:02d}".encode() for i in range(per_key)]
    assert sorted(got[None]) == [p for _, p, ok in items if ok is None]
    rows = await outbox_rows(producer)
    assert sorted(m.idempotency_key or "" for m in messages) == sorted(r["key"] for r in rows)
    assert {m.id for m in messages} == {r["message_id"] for r in rows}
    counts = await native.counts(SUB)
    assert counts.ready == counts.leased == 0  # nothing more was published
    assert sum(r.stats.sent for r in relays) == len(items)
    assert all(r.stats.duplicates == r.stats.failed == r.stats.errors == 0 for r in relays)
    assert all(r["sent_at"] is not None and r["attempts"] == 1 for r in rows)


# -- failures ------------------------------------------------------------------------------------
async def test_broker_down_rows_back_off_and_are_sent_once_it_is_back(
    native_factory: NativeFactory, producer: asyncpg.Pool
) -> None:
    h1 = await native_factory(audit=False)
    await make_queue(h1, TOPIC, SUB)
    # reconnects on its own (as a relay's client does), but gives up on a request at once
    # while disconnected, so each pass fails fast instead of waiting for the broker
    client = await h1.connect(reconnect=True, retry_for=0.0)
    await enqueue_each(producer, [(TOPIC, b"K0", "K"), (TOPIC, b"K1", "K"), (TOPIC, b"free", None)])
    clock = ManualClock(datetime.now(UTC))  # after the commits: the rows are due
    relay = OutboxRelay(
        producer, client, clock=clock, rng=random.Random(5), backoff_base=0.5, backoff_max=60
    )

    link = client._link
    assert link is not None
    await h1.server.close(grace=IO_TIMEOUT)
    async with asyncio.timeout(IO_TIMEOUT):
        await link.lost.wait()

    def due_after(r: asyncpg.Record) -> float:
        return float((r["next_attempt_at"] - clock.now()).total_seconds())

    assert await relay.relay_once() == 0
    k0, k1, free = await outbox_rows(producer)
    # K1 is not attempted after K0 failed; K0 and the free row wait base * 2**0 (+jitter)
    assert [(r["attempts"], r["last_error"]) for r in (k0, k1, free)] == [
        (1, "unavailable"),
        (0, None),
        (1, "unavailable"),
    ]
    assert 0.25 <= due_after(k0) <= 0.5 and 0.25 <= due_after(free) <= 0.5
    assert all(r["sent_at"] is None for r in (k0, k1, free))

    clock.advance(0.5)
    assert await relay.relay_once() == 0
    k0, k1, free = await outbox_rows(producer)
    assert (k0["attempts"], k1["attempts"], free["attempts"]) == (2, 0, 2)
    assert 0.5 <= due_after(k0) <= 1.0 and 0.5 <= due_after(free) <= 1.0
    assert relay.stats == RelayStats(failed=4)

    # the broker comes back on the same address; the client reconnects by itself
    h2 = await native_factory(audit=False, port=h1.port)
    async with asyncio.timeout(IO_TIMEOUT):
        await client._ready.wait()

    assert await relay.relay_once() == 0  # the backoff has not elapsed: nothing is tried
    assert [r["attempts"] for r in await outbox_rows(producer)] == [2, 0, 2]

    clock.advance(1.0)
    assert await relay.relay_once() == 3
    assert relay.stats == RelayStats(sent=3, failed=4)
    rows = await outbox_rows(producer)
    assert [(r["attempts"], r["last_error"]) for r in rows] == [(3, None), (1, None), (3, None)]
    assert await h2.message_count() == 3
    got = by_ordering_key(await drain(client, SUB, 3))
    assert got == {"K": [b"K0", b"K1"], None: [b"free"]}


async def test_relay_killed_between_confirm_and_commit_leaves_one_message(
    native: NativeHarness, producer: asyncpg.Pool
) -> None:
    await make_queue(native, TOPIC, SUB)
    await enqueue_each(producer, [(TOPIC, b"K0", "K"), (TOPIC, b"K1", "K"), (TOPIC, b"free", None)])

    doomed = KilledBeforeCommit(producer, await native.connect())
    task = asyncio.create_task(doomed.run(asyncio.Event()))
    async with asyncio.timeout(IO_TIMEOUT):
        await doomed.confirmed.wait()
    first = {o.row.key: o.result for o in doomed.outcomes}
    assert len(first) == 3
    assert all(r is not None and not r.duplicate for r in first.values())
    assert await native.message_count() == 3  # the broker has them ...
    task.cancel()  # ... and the relay dies before committing
    with pytest.raises(asyncio.CancelledError):
        await task
    rows = await outbox_rows(producer)
    assert [(r["sent_at"], r["attempts"]) for r in rows] == [(None, 0)] * 3

    # the next relay (a restarted process: its own connection) publishes them again
    relay = OutboxRelay(producer, await native.connect())
    assert await relay.relay_once() == 3
    assert relay.stats == RelayStats(sent=3, duplicates=3)
    for r in await outbox_rows(producer):
        original = first[r["key"]]
        assert original is not None and r["message_id"] == original.message_id
    assert await native.message_count() == 3
    messages = await drain(await native.connect(), SUB, 3)
    assert {m.id for m in messages} == {r.message_id for r in first.values() if r is not None}
    counts = await native.counts(SUB)
    assert counts.ready == counts.leased == 0


async def test_refused_rows_are_kept_and_retried_until_the_cause_is_fixed(
    native: NativeHarness, producer: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker refusal that waiting cannot fix (here a missing topic) is recorded, logged as
    an error and retried with backoff; the row is never dropped. It holds back only the later
    rows of its own topic and ordering key."""
    await make_queue(native, TOPIC, SUB)
    await enqueue_each(
        producer,
        [
            (OTHER_TOPIC, b"lost-free", None),
            (TOPIC, b"free", None),
            (OTHER_TOPIC, b"K0", "K"),
            (OTHER_TOPIC, b"K1", "K"),
            (TOPIC, b"K0-here", "K"),
        ],
    )
    clock = ManualClock(datetime.now(UTC))
    relay = OutboxRelay(producer, await native.connect(), clock=clock, rng=random.Random(1))

    # the two free rows go in one atomic batch, refused as a whole; retried one by one, the
    # good one goes through
    assert await relay.relay_once() == 2
    rows = await outbox_rows(producer)
    assert [
        (bytes(r["payload"]), r["attempts"], r["last_error"], r["sent_at"] is None) for r in rows
    ] == [
        (b"lost-free", 1, "topic_not_found", True),
        (b"free", 1, None, False),
        (b"K0", 1, "topic_not_found", True),
        (b"K1", 0, None, True),
        (b"K0-here", 1, None, False),
    ]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("topic_not_found" in r.getMessage() for r in errors)
    assert not any("lost-free" in r.getMessage() for r in caplog.records)  # no payloads

    await make_queue(native, OTHER_TOPIC, OTHER_SUB)
    assert await relay.relay_once() == 0  # not before the backoff
    clock.advance(relay.backoff_max)
    assert await relay.relay_once() == 3
    assert all(r["sent_at"] is not None for r in await outbox_rows(producer))
    got = by_ordering_key(await drain(await native.connect(), OTHER_SUB, 3))
    assert got == {"K": [b"K0", b"K1"], None: [b"lost-free"]}


def test_backoff_doubles_from_base_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(3)
    for attempt, low, high in [(1, 0.25, 0.5), (2, 0.5, 1.0), (4, 2.0, 4.0), (60, 30.0, 60.0)]:
        for _ in range(20):
            d = backoff_delay(attempt, base=0.5, cap=60.0, rng=rng).total_seconds()
            assert low <= d <= high


async def test_purge_sent_removes_only_sent_rows_older_than_the_cutoff(
    native: NativeHarness, producer: asyncpg.Pool
) -> None:
    await make_queue(native, TOPIC, SUB)
    await enqueue_each(producer, [(TOPIC, f"m{i}".encode(), None) for i in range(5)])
    await enqueue_each(producer, [(OTHER_TOPIC, b"unsent", None)])  # no such topic
    clock = ManualClock(datetime.now(UTC))
    assert await OutboxRelay(producer, await native.connect(), clock=clock).relay_once() == 5
    async with producer.acquire() as conn:
        assert await purge_sent(conn, clock.now()) == 0
        assert await purge_sent(conn, clock.now() + timedelta(seconds=1), batch=2) == 5
    rows = await outbox_rows(producer)
    assert [bytes(r["payload"]) for r in rows] == [b"unsent"]


# -- the CLI -----------------------------------------------------------------------------------
async def test_cli_migrate_then_relay_once(native: NativeHarness, producer_dsn: str) -> None:
    await make_queue(native, TOPIC, SUB)
    for _ in range(2):
        result = await run_cli("outbox", "migrate", "--dsn", producer_dsn)
        assert result.exit_code == 0, result.output
        assert "sb_outbox is installed" in result.output

    conn = await asyncpg.connect(producer_dsn)
    try:
        async with conn.transaction():
            for i in range(3):
                await enqueue(conn, TOPIC, f"m{i}".encode(), ordering_key="K")
        result = await run_cli(
            "outbox", "relay", "--once", "--dsn", producer_dsn, *cli_args(native)
        )
        assert result.exit_code == 0, result.output
        assert "sent 3 (0 duplicates), failed 0" in result.output
        assert await conn.fetchval("SELECT count(*) FROM sb_outbox WHERE sent_at IS NULL") == 0

        # a row the broker refuses: reported, kept, exit status 1
        await enqueue(conn, OTHER_TOPIC, b"nowhere")
        result = await run_cli(
            "outbox", "relay", "--once", "--dsn", producer_dsn, *cli_args(native)
        )
        assert result.exit_code == 1, result.output
        assert "1 publish attempts failed" in result.output
        assert "Traceback" not in result.output
        assert await conn.fetchval("SELECT last_error FROM sb_outbox WHERE sent_at IS NULL") == (
            "topic_not_found"
        )
    finally:
        await conn.close()
    assert await native.message_count() == 3
    got = by_ordering_key(await drain(await native.connect(), SUB, 3))
    assert got == {"K": [b"m0", b"m1", b"m2"]}


async def test_cli_errors_are_one_line(native: NativeHarness, producer_dsn: str) -> None:
    result = await run_cli("outbox", "relay", "--once", "--dsn", producer_dsn, *cli_args(native))
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "sb_outbox not found" in result.output
    assert len(result.output.strip().splitlines()) == 1

    assert (await run_cli("outbox", "migrate", "--dsn", producer_dsn)).exit_code == 0
    result = await run_cli(
        "outbox", "relay", "--once", "--dsn", producer_dsn, *cli_args(native, port=1)
    )
    assert result.exit_code == 1
    assert result.output.startswith("error: unavailable: ")
    assert len(result.output.strip().splitlines()) == 1

    result = await run_cli("outbox", "migrate", "--dsn", "postgresql://127.0.0.1:1/x")
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "Traceback" not in result.output
