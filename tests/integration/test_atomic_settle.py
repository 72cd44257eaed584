"""Atomic settle through the SDK over mutual TLS (DESIGN §3.6): a consumer acks its input and
publishes its outputs in one broker transaction; a retry after an unknown outcome is
idempotent; nothing happens when any part is refused."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from auth_fixtures import AuthFactory, Issuer, auth_native_fixture, issuer_fixture
from native_fixtures import CLIENT, IO_TIMEOUT, NativeHarness, make_queue

from securebroker.client import Message, OutgoingMessage, Subscription
from securebroker.errors import AuthorizationError, StaleLease

pytestmark = pytest.mark.asyncio
__all__ = ["auth_native_fixture", "issuer_fixture"]


async def next_message(sub: Subscription) -> Message:
    async with asyncio.timeout(IO_TIMEOUT):
        return await anext(sub)


async def pipeline(h: NativeHarness) -> None:
    await make_queue(h, "payments.requested", "payments.worker")
    await make_queue(h, "payments.completed", "ledger")


async def test_ack_and_publish_in_one_transaction(native: NativeHarness) -> None:
    await pipeline(native)
    client = await native.connect(CLIENT)
    published = await client.publish("payments.requested", b"pay 10", idempotency_key="p1")
    sub = client.consume("payments.worker", credit=1)
    msg = await next_message(sub)
    out = await msg.settle([OutgoingMessage("payments.completed", b"paid 10")])
    assert not out.duplicate and len(out.results) == 1
    ledger = client.consume("ledger", credit=1)
    result = await next_message(ledger)
    assert result.payload == b"paid 10" and result.id == out.results[0].message_id
    assert result.idempotency_key is not None  # derived from the settle id
    await result.ack()
    counts = await native.counts("payments.worker")
    assert (counts.ready, counts.leased) == (0, 0)
    # the audit trail shows the input acked and the output published by the same actor
    assert native.audit is not None
    trail = [r.event for r in await native.audit.trail(published.message_id)]
    assert trail == ["published", "delivered", "acked"]
    out_trail = await native.audit.trail(out.results[0].message_id)
    assert out_trail[0].event == "published"
    await sub.close()
    await ledger.close()


async def test_a_retried_settle_is_recognised_and_changes_nothing(native: NativeHarness) -> None:
    await pipeline(native)
    client = await native.connect(CLIENT)
    await client.publish("payments.requested", b"pay 20")
    sub = client.consume("payments.worker", credit=1)
    msg = await next_message(sub)
    outputs = [OutgoingMessage("payments.completed", b"paid 20")]
    first = await client.settle([msg], outputs)
    # the same settle again, as a client does when the reply was lost
    again = await client.settle([msg], outputs)
    assert again.duplicate and again.results == first.results
    counts = await native.counts("ledger")
    assert counts.ready == 1
    await sub.close()


async def test_a_stale_input_means_no_output(native: NativeHarness) -> None:
    await pipeline(native)
    client = await native.connect(CLIENT)
    await client.publish("payments.requested", b"pay 30")
    sub = client.consume("payments.worker", credit=1, lease=timedelta(seconds=5))
    msg = await next_message(sub)
    await sub.close()
    native.clock.advance(10)  # the lease ran out: the message is someone else's now
    taken = await native.broker.receive("payments.worker", 1, consumer="other")
    assert taken[0].message_id == msg.id
    with pytest.raises(StaleLease, match="nothing was acked or published"):
        await msg.settle([OutgoingMessage("payments.completed", b"paid 30")])
    assert (await native.counts("ledger")).ready == 0


async def test_a_forbidden_output_means_the_input_is_not_acked(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    a = await auth_native()
    # svc-orders may consume orders.# and publish orders.#, but not payments.#
    await make_queue(a.h, "orders.created", "orders.worker")
    await make_queue(a.h, "payments.completed", "ledger")
    client = await a.connect(token=issuer.mint())
    await client.publish("orders.created", b"o")
    sub = client.consume("orders.worker", credit=1)
    msg = await next_message(sub)
    with pytest.raises(AuthorizationError):
        await msg.settle([OutgoingMessage("payments.completed", b"x")])
    counts = await a.h.counts("orders.worker")
    assert counts.leased == 1  # still ours: nothing was acked
    assert (await a.h.counts("ledger")).ready == 0
    await msg.ack()
    await sub.close()
