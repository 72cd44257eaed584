"""The consumer inbox on a real PostgreSQL (the consumer's own database) and a real broker over
mutual TLS: effects happen once per message, whatever is redelivered (DESIGN §3.7)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from native_fixtures import CLIENT, IO_TIMEOUT, NativeHarness, make_queue

from securebroker.client import Message, OutgoingMessage, Subscription
from securebroker.inbox import Inbox, install

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def ledger_db(empty_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """The consumer's own database: a ledger table and the inbox."""
    pool = await asyncpg.create_pool(empty_dsn, min_size=1, max_size=4)
    assert pool is not None
    async with pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE ledger (payment text PRIMARY KEY, amount int NOT NULL, "
            "entries int NOT NULL DEFAULT 1)"
        )
        await install(conn)
        await install(conn)  # idempotent
    try:
        yield pool
    finally:
        await pool.close()


async def debit(conn: asyncpg.Connection, message: Message) -> list[OutgoingMessage]:
    """The effect: a ledger entry (a second one would bump ``entries``), and a result."""
    payment = message.payload.decode()
    await conn.execute(
        "INSERT INTO ledger (payment, amount) VALUES ($1, 10) "
        "ON CONFLICT (payment) DO UPDATE SET entries = ledger.entries + 1",
        payment,
    )
    return [OutgoingMessage("payments.completed", f"done {payment}".encode())]


async def next_message(sub: Subscription) -> Message:
    async with asyncio.timeout(IO_TIMEOUT):
        return await anext(sub)


async def entries(pool: asyncpg.Pool) -> dict[str, int]:
    return {r["payment"]: r["entries"] for r in await pool.fetch("SELECT * FROM ledger")}


async def flow(h: NativeHarness) -> None:
    await make_queue(h, "payments.requested", "payments.worker", max_attempts=5)
    await make_queue(h, "payments.completed", "results")


async def test_first_delivery_takes_effect_and_settles_atomically(
    native: NativeHarness, ledger_db: asyncpg.Pool
) -> None:
    await flow(native)
    client = await native.connect(CLIENT)
    await client.publish("payments.requested", b"p-1")
    sub = client.consume("payments.worker", credit=1)
    result = await Inbox(ledger_db, "payments").process(await next_message(sub), debit)
    assert result.processed and result.settled and len(result.outputs) == 1
    assert await entries(ledger_db) == {"p-1": 1}
    assert (await native.counts("payments.worker")).leased == 0
    assert (await native.counts("results")).ready == 1
    row = await ledger_db.fetchrow("SELECT settled_at, redeliveries FROM sb_inbox")
    assert row is not None and row["settled_at"] is not None and row["redeliveries"] == 0
    await sub.close()


async def test_a_crash_between_commit_and_settle_has_no_second_effect(
    native: NativeHarness, ledger_db: asyncpg.Pool
) -> None:
    await flow(native)
    client = await native.connect(CLIENT)
    await client.publish("payments.requested", b"p-2")
    sub = client.consume("payments.worker", credit=1, lease=timedelta(seconds=5))
    first = await next_message(sub)
    inbox = Inbox(ledger_db, "payments")
    # the effect commits, then the process "dies" before settling: no ack reaches the broker
    await inbox._take_effect(first, debit)
    await sub.close()
    native.clock.advance(10)  # its lease runs out: the message is delivered again
    sub = client.consume("payments.worker", credit=1)
    again = await next_message(sub)
    assert again.id == first.id and again.attempt == 2
    handled: list[str] = []

    async def must_not_run(conn: asyncpg.Connection, m: Message) -> None:
        handled.append(m.payload.decode())

    result = await inbox.process(again, must_not_run)
    assert not result.processed and result.settled and handled == []
    assert await entries(ledger_db) == {"p-2": 1}  # one effect
    # the stored output was published once, with the ack
    assert (await native.counts("results")).ready == 1
    assert (await native.counts("payments.worker")).leased == 0
    redeliveries = await ledger_db.fetchval("SELECT redeliveries FROM sb_inbox")
    assert redeliveries == 1  # the duplicate is recorded, not applied
    await sub.close()


async def test_a_failing_handler_rolls_back_and_the_message_comes_back(
    native: NativeHarness, ledger_db: asyncpg.Pool
) -> None:
    await flow(native)
    client = await native.connect(CLIENT)
    await client.publish("payments.requested", b"p-3")
    sub = client.consume("payments.worker", credit=1)
    inbox = Inbox(ledger_db, "payments")

    async def broken(conn: asyncpg.Connection, m: Message) -> None:
        await debit(conn, m)  # written, then rolled back by the error below
        raise RuntimeError("card=4111111111111111 declined")

    with pytest.raises(RuntimeError):
        await inbox.process(await next_message(sub), broken)
    assert await entries(ledger_db) == {}
    assert await ledger_db.fetchval("SELECT count(*) FROM sb_inbox") == 0
    native.clock.advance(60)  # past the nack's backoff
    retry = await next_message(sub)
    assert retry.attempt == 2
    result = await inbox.process(retry, debit)
    assert result.processed and await entries(ledger_db) == {"p-3": 1}
    await sub.close()


async def test_each_service_takes_effect_once(
    native: NativeHarness, ledger_db: asyncpg.Pool
) -> None:
    await make_queue(native, "payments.requested", "audit.copy")
    await make_queue(native, "payments.completed", "results")
    await native.broker.create_subscription("payments.worker", "payments.requested")
    client = await native.connect(CLIENT)
    await client.publish("payments.requested", b"p-4")
    for sub_name, inbox_name in (("payments.worker", "payments"), ("audit.copy", "archive")):
        sub = client.consume(sub_name, credit=1)
        result = await Inbox(ledger_db, inbox_name).process(await next_message(sub), debit)
        assert result.processed
        await sub.close()
    assert await entries(ledger_db) == {"p-4": 2}  # one per service, by design
    assert await ledger_db.fetchval("SELECT count(*) FROM sb_inbox") == 2


async def test_stored_outputs_replay_exactly() -> None:
    """What a redelivery publishes is what the first run asked for, delay and expiry included."""
    from datetime import UTC, datetime  # noqa: PLC0415

    from securebroker.inbox import _decode_outputs, _encode_outputs  # noqa: PLC0415

    out = OutgoingMessage(
        "payments.completed",
        b"\x00\xffbytes",
        {"k": "v"},
        "application/json",
        "key-1",
        "order-9",
        datetime(2026, 12, 1, 12, 0, 0, 123000, tzinfo=UTC),
        datetime(2026, 12, 2, tzinfo=UTC),
        {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"},
    )
    assert _decode_outputs(_encode_outputs([out])) == [out]
