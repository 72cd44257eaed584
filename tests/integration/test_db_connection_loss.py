"""The database connections drop under a running broker (a PostgreSQL restart or failover looks
like this to it): clients recover on their own, no confirmed message is lost, consumers keep
receiving, and the audit trail continues on fresh chains that still verify."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from native_fixtures import CLIENT, IO_TIMEOUT, NativeHarness, make_queue

from securebroker.client import Message, Subscription

pytestmark = pytest.mark.asyncio


async def next_message(sub: Subscription) -> Message:
    async with asyncio.timeout(IO_TIMEOUT):
        return await anext(sub)


async def drop_broker_connections(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'securebroker' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return n


async def test_clients_and_consumers_recover_after_the_connections_drop(
    native: NativeHarness, pg_dsn: str
) -> None:
    await make_queue(native, "orders", "orders.work")
    client = await native.connect(CLIENT)
    sub = client.consume("orders.work", credit=10)
    await client.publish("orders", b"before", idempotency_key="k-before")
    assert (await next_message(sub)).payload == b"before"
    assert await drop_broker_connections(pg_dsn) > 0
    # the SDK retries the keyed publish until the broker's pool has reconnected
    confirmed = [
        await client.publish("orders", f"after {i}".encode(), idempotency_key=f"k-{i}")
        for i in range(5)
    ]
    got = [await next_message(sub) for _ in range(5)]
    assert sorted(m.payload for m in got) == sorted(f"after {i}".encode() for i in range(5))
    assert {m.id for m in got} == {c.message_id for c in confirmed}
    for m in got:
        await m.ack()
    await sub.close()
    # the audit chains that were open when the connections dropped were retired; what was
    # written verifies, old chains and new
    assert native.audit is not None
    await native.audit.checkpoint()
    from test_audit_tamper import export_and_verify  # noqa: PLC0415

    code, report = await export_and_verify(native, native.tls.pki.ca_cert.parent)
    assert code == 0, report


async def test_a_consumer_whose_lease_query_dies_keeps_consuming(
    native: NativeHarness, pg_dsn: str
) -> None:
    """The connection drops while a lease query is running (the case that killed consumers)."""
    await make_queue(native, "orders", "orders.work")
    client = await native.connect(CLIENT)
    sub = client.consume("orders.work", credit=10)
    await client.publish("orders", b"first")
    assert (await next_message(sub)).payload == b"first"
    blocker = await asyncpg.connect(pg_dsn)
    try:
        async with blocker.transaction():
            # every lease query now waits on this lock: it is in flight when the drop comes
            await blocker.execute("LOCK TABLE sb_deliveries IN ACCESS EXCLUSIVE MODE")
            async with asyncio.timeout(IO_TIMEOUT):
                # each round is a query to the server: no sleeping, bounded by the timeout
                while not await blocker.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'securebroker' AND wait_event_type = 'Lock'"
                ):
                    pass
            assert await drop_broker_connections(pg_dsn) > 0
    finally:
        await blocker.close()
    await client.publish("orders", b"second", idempotency_key="k2")
    assert (await next_message(sub)).payload == b"second"
    await sub.close()
