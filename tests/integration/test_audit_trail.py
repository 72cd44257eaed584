"""The audit trail on a real PostgreSQL over real mutual TLS (DESIGN §4, ADR 0008).

One message is followed through publish, a duplicate publish, a nack, a redelivery and an ack,
and ``securebroker audit trail`` (the real CLI, as an auditor runs it, against the running
broker) must return exactly that life. The ``ManualClock`` moves one second between steps, so
the trail's time order is the order of the steps.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from native_fixtures import (
    ADMIN,
    ADMIN_PRINCIPAL,
    CLIENT,
    CLIENT_PRINCIPAL,
    IO_TIMEOUT,
    NativeHarness,
    make_queue,
)

from securebroker.audit.record import Event, recompute
from securebroker.cli import main
from securebroker.client import Message, Subscription

pytestmark = pytest.mark.asyncio


async def next_message(sub: Subscription) -> Message:
    async with asyncio.timeout(IO_TIMEOUT):
        return await anext(sub)


def cli_args(h: NativeHarness, name: str = ADMIN) -> list[str]:
    cert, key = h.tls.pki.clients[name]
    return [
        "--host",
        h.host,
        "--port",
        str(h.port),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--ca",
        str(h.tls.pki.ca_cert),
    ]


async def run_cli(*args: str) -> Any:
    """The real CLI in a thread (it runs its own event loop; the broker keeps running here)."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def follow_one_message(h: NativeHarness) -> uuid.UUID:
    """publish, duplicate publish, nack, redelivery, ack: one message's whole life."""
    await make_queue(h, "payments.orders", "ledger", max_attempts=5)
    producer = await h.connect(CLIENT)
    consumer = await h.connect(ADMIN)
    h.clock.advance(1)
    first = await producer.publish(
        "payments.orders", b"card=4111111111111111", idempotency_key="order-77"
    )
    h.clock.advance(1)
    again = await producer.publish(
        "payments.orders", b"card=4111111111111111", idempotency_key="order-77"
    )
    assert again.message_id == first.message_id and again.duplicate
    h.clock.advance(1)
    sub = consumer.consume("ledger", credit=1)
    msg = await next_message(sub)
    assert msg.attempt == 1
    h.clock.advance(1)
    await msg.nack("declined by issuer", delay=timedelta(0))
    h.clock.advance(1)
    msg = await next_message(sub)
    assert msg.attempt == 2 and msg.id == first.message_id
    h.clock.advance(1)
    await msg.ack()
    await sub.close()
    return first.message_id


async def test_trail_of_one_message_through_its_whole_life(native: NativeHarness) -> None:
    mid = await follow_one_message(native)

    result = await run_cli("audit", "trail", str(mid), "--json", *cli_args(native))
    assert result.exit_code == 0, result.output
    trail = json.loads(result.output)
    assert [
        (r["event"], r["outcome"], r["actor_cert"], r["detail"].get("attempt")) for r in trail
    ] == [
        (Event.PUBLISHED, "success", CLIENT_PRINCIPAL, None),
        (Event.DEDUPLICATED, "success", CLIENT_PRINCIPAL, None),
        (Event.DELIVERED, "success", ADMIN_PRINCIPAL, 1),
        (Event.NACKED, "success", ADMIN_PRINCIPAL, 1),
        (Event.DELIVERED, "success", ADMIN_PRINCIPAL, 2),
        (Event.ACKED, "success", ADMIN_PRINCIPAL, None),
    ]
    for r in trail:
        # the hot steps are batch records listing the message (ADR 0013), the others its own
        if r["event"] in (Event.PUBLISHED, Event.DELIVERED, Event.ACKED):
            assert r["message_id"] is None
            assert r["message_ids"] == [str(mid)]
            assert r["trace_ids"] == [None]
        else:
            assert r["message_id"] == str(mid)
            assert "message_ids" not in r
        assert r["topic"] == "payments.orders"
        assert r["origin_proto"] == "native"
        assert r["origin_addr"].startswith("127.0.0.1:")
    assert [r["subscription"] for r in trail] == [
        None,
        None,
        "ledger",
        "ledger",
        "ledger",
        "ledger",
    ]
    # each record's stored hash is the hash of its fields and its predecessor's hash
    from securebroker.audit.record import AuditRecord  # noqa: PLC0415

    for r in trail:
        rec = AuditRecord.from_json(r)
        assert recompute(rec) == rec.hash

    # the human form names the same steps, in order
    table = await run_cli("audit", "trail", str(mid), *cli_args(native))
    assert table.exit_code == 0, table.output
    events = [line.split()[1] for line in table.output.splitlines()[2:]]
    assert events == ["published", "deduplicated", "delivered", "nacked", "delivered", "acked"]


async def test_records_hold_no_payload_and_no_consumer_error_text(native: NativeHarness) -> None:
    await follow_one_message(native)
    assert native.audit is not None
    async with native.store.pool.acquire() as conn:
        dump = await conn.fetchval("SELECT string_agg(t::text, '\n') FROM sb_audit t")
    assert "4111111111111111" not in dump
    assert "declined by issuer" not in dump  # a nack's error text may quote the payload


async def test_trail_of_an_unknown_message_is_empty(native: NativeHarness) -> None:
    await make_queue(native, "orders", "s")
    unknown = uuid.uuid4()
    result = await run_cli("audit", "trail", str(unknown), *cli_args(native))
    assert result.exit_code == 0, result.output
    assert f"no audit records for message {unknown}" in result.output


async def test_trail_rejects_a_malformed_message_id(native: NativeHarness) -> None:
    result = await run_cli("audit", "trail", "not-a-uuid", *cli_args(native))
    assert result.exit_code == 1
    assert "message id" in result.output


async def test_dead_letter_and_redrive_are_in_the_trail(native: NativeHarness) -> None:
    await make_queue(native, "orders", "work", max_attempts=1)
    client = await native.connect(CLIENT)
    admin = await native.connect(ADMIN)
    published = await client.publish("orders", b"x")
    sub = client.consume("work", credit=1)
    native.clock.advance(1)
    msg = await next_message(sub)
    native.clock.advance(1)
    await msg.nack("boom")  # the last attempt: dead-lettered
    await sub.close()
    native.clock.advance(1)
    assert (await admin.admin("dlq.redrive", name="work"))["redriven"] == 1
    native.clock.advance(1)
    assert (await admin.admin("subscription.purge", name="work"))["purged"] == 1

    result = await run_cli("audit", "trail", str(published.message_id), "--json", *cli_args(native))
    assert result.exit_code == 0, result.output
    trail = json.loads(result.output)
    assert [r["event"] for r in trail] == [
        "published",
        "delivered",
        "nacked",
        "dead_lettered",
        "redriven",
        "purged",
    ]
    assert trail[3]["detail"] == {"reason": "max_attempts", "attempts": 1}
    assert trail[4]["actor_cert"] == ADMIN_PRINCIPAL


async def test_lease_expiry_and_expiry_sweep_are_recorded(native: NativeHarness) -> None:
    await make_queue(native, "orders", "work", max_attempts=3)
    client = await native.connect(CLIENT)
    published = await client.publish("orders", b"x")
    first = await native.broker.receive("work", lease=timedelta(seconds=5), consumer="c1")
    assert len(first) == 1
    native.clock.advance(10)  # the lease runs out; the next receive re-leases it
    second = await native.broker.receive("work", lease=timedelta(seconds=5), consumer="c2")
    assert [d.attempt for d in second] == [2]
    expiring = await client.publish(
        "orders", b"y", expires_at=native.clock.now() + timedelta(seconds=30)
    )
    native.clock.advance(60)
    swept = await native.broker.sweep()
    assert swept.expired == 1
    assert native.audit is not None
    trail = [r.event for r in await native.audit.trail(published.message_id)]
    assert trail == ["published", "delivered", "lease_expired", "delivered"]
    gone = [r.event for r in await native.audit.trail(expiring.message_id)]
    assert gone == ["published", "expired"]


async def test_rejected_publish_is_recorded_with_its_reason(native: NativeHarness) -> None:
    await make_queue(native, "orders", "s")
    client = await native.connect(CLIENT)
    await client.publish("orders", b"one", idempotency_key="k1")
    from securebroker.errors import IdempotencyConflict  # noqa: PLC0415

    with pytest.raises(IdempotencyConflict):
        await client.publish("orders", b"two", idempotency_key="k1")
    assert native.audit is not None
    await native.audit.close()  # flushes the queued events (and signs a final checkpoint)
    async with native.store.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT outcome, detail::jsonb AS detail, actor_cert FROM sb_audit "
            "WHERE event = 'rejected'"
        )
    assert row is not None
    assert row["outcome"] == "failure"
    assert row["detail"] == {"reason": "idempotency_conflict"}
    assert row["actor_cert"] == CLIENT_PRINCIPAL


async def test_admin_actions_are_recorded_in_the_same_transaction(
    native: NativeHarness, tmp_path: Path
) -> None:
    admin = await native.connect(ADMIN)
    await admin.admin("topic.create", name="orders")
    await admin.admin("subscription.create", name="s", topic="orders")
    await admin.admin("subscription.delete", name="s")
    await admin.admin("topic.delete", name="orders")
    async with native.store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT detail::jsonb->>'operation' AS op, actor_cert, topic FROM sb_audit "
            "WHERE event = 'admin' ORDER BY chain, seq"
        )
    assert sorted(r["op"] for r in rows) == [
        "subscription.create",
        "subscription.delete",
        "topic.create",
        "topic.delete",
    ]
    assert {r["actor_cert"] for r in rows} == {ADMIN_PRINCIPAL}
    assert {r["topic"] for r in rows} == {"orders"}


async def test_the_log_is_append_only_for_ordinary_sessions(native: NativeHarness) -> None:
    await follow_one_message(native)
    import asyncpg  # noqa: PLC0415

    async with native.store.pool.acquire() as conn:
        for sql in (
            "UPDATE sb_audit SET actor_cert = 'mallory'",
            "DELETE FROM sb_audit",
            "TRUNCATE sb_audit",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)


async def test_records_carry_the_producers_trace_id(native: NativeHarness) -> None:
    """From an audit record to the trace: publish and delivery records name the W3C trace id
    the producer's context carried."""
    await make_queue(native, "orders", "work")
    client = await native.connect(CLIENT)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    published = await client.publish(
        "orders", b"x", trace_context={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    sub = client.consume("work", credit=1)
    await (await next_message(sub)).ack()
    await sub.close()
    assert native.audit is not None
    mid = str(published.message_id)
    trail = {r.event: r.trace_of(mid) for r in await native.audit.trail(published.message_id)}
    assert trail["published"] == trace_id
    assert trail["delivered"] == trace_id


async def test_every_page_of_an_audit_read_is_itself_recorded(native: NativeHarness) -> None:
    await follow_one_message(native)
    admin = await native.connect(ADMIN)
    # a first page asked for with an explicit cursor is still an access
    await admin.admin("audit.export", after=[0, 0])
    await admin.admin("audit.search", after=["1970-01-01T00:00:00+00:00", 0, 0])
    assert native.audit is not None
    await native.audit.flush()
    async with native.store.pool.acquire() as conn:
        ops = await conn.fetch(
            "SELECT detail::jsonb->>'operation' AS op, actor_cert FROM sb_audit "
            "WHERE event = 'audit_access' ORDER BY chain, seq"
        )
    assert sorted(r["op"] for r in ops) == ["audit.export", "audit.search"]
    assert {r["actor_cert"] for r in ops} == {ADMIN_PRINCIPAL}


async def test_concurrent_checkpoints_do_not_collide(native: NativeHarness) -> None:
    await follow_one_message(native)
    assert native.audit is not None
    signed = await asyncio.gather(*(native.audit.checkpoint() for _ in range(3)))
    assert sum(cp is not None for cp in signed) == 1  # one signs; the others find it done
    await follow_one_message_again(native)
    assert await native.audit.checkpoint() is not None  # and numbering carries on


async def follow_one_message_again(h: NativeHarness) -> None:
    client = await h.connect(CLIENT)
    await client.publish("payments.orders", b"more")


async def test_a_bad_name_in_an_admin_request_is_refused_before_it_is_recorded(
    native: NativeHarness,
) -> None:
    admin = await native.connect(ADMIN)
    from securebroker.errors import ValidationError  # noqa: PLC0415

    with pytest.raises(ValidationError, match="is invalid"):
        await admin.admin("topic.create", name="x\x00y")
    # the writer is not stuck: later events are written
    await make_queue(native, "orders", "s")
    assert native.audit is not None
    await native.audit.flush()
    async with native.store.pool.acquire() as conn:
        n = await conn.fetchval("SELECT count(*) FROM sb_audit WHERE event = 'admin'")
    assert n >= 2
