"""Atomic settle (DESIGN §3.6), held to one contract by every store adapter: acks and publishes
in one transaction, all or nothing, and idempotent under a settle id."""

from __future__ import annotations

from datetime import timedelta

import pytest

from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import Delivery, PublishRequest, SettleRef
from securebroker.errors import IdempotencyConflict, StaleLease, TopicNotFound, ValidationError

pytestmark = pytest.mark.asyncio


async def setup(broker: Broker) -> None:
    for topic, sub in (("orders", "orders.work"), ("results", "results.work")):
        await broker.create_topic(topic)
        await broker.create_subscription(sub, topic, max_attempts=5)


def ref(d: Delivery) -> SettleRef:
    return SettleRef(d.subscription, d.message_id, d.lease_token)


async def take(broker: Broker, sub: str, n: int = 1) -> list[Delivery]:
    got = await broker.receive(sub, n, consumer="c")
    assert len(got) == n
    return got


async def test_acks_and_outputs_take_effect_together(broker: Broker) -> None:
    await setup(broker)
    await broker.publish(PublishRequest("orders", b"o1"))
    await broker.publish(PublishRequest("orders", b"o2"))
    inputs = await take(broker, "orders.work", 2)
    out = await broker.settle(
        [ref(d) for d in inputs],
        [PublishRequest("results", b"r1"), PublishRequest("results", b"r2")],
        settle_id="s-1",
        producer="svc",
    )
    assert not out.duplicate and len(out.results) == 2
    assert not any(r.duplicate for r in out.results)
    counts = (await broker.get_subscription("orders.work")).counts
    assert counts is not None and (counts.ready, counts.leased) == (0, 0)
    results = await take(broker, "results.work", 2)
    assert sorted(d.payload for d in results) == [b"r1", b"r2"]
    assert {d.message_id for d in results} == {r.message_id for r in out.results}


async def test_a_stale_ack_means_nothing_is_acked_or_published(
    broker: Broker, clock: ManualClock
) -> None:
    await setup(broker)
    await broker.publish(PublishRequest("orders", b"fresh"))
    await broker.publish(PublishRequest("orders", b"expiring"))
    first = await broker.receive("orders.work", 1, lease=timedelta(seconds=5), consumer="c")
    clock.advance(1)
    second = await broker.receive("orders.work", 1, lease=timedelta(seconds=60), consumer="c")
    clock.advance(10)  # the first lease ran out; someone else takes that message
    stolen = await broker.receive("orders.work", 1, consumer="other")
    assert stolen[0].message_id == first[0].message_id
    with pytest.raises(StaleLease, match="nothing was acked or published"):
        await broker.settle(
            [ref(second[0]), ref(first[0])],
            [PublishRequest("results", b"never")],
            settle_id="s-stale",
            producer="svc",
        )
    # the valid ack did not happen either, and no output exists
    await broker.ack(ref(second[0]))  # still leased by us: this works now
    counts = (await broker.get_subscription("results.work")).counts
    assert counts is not None and counts.ready == 0
    # and the id was not used up: a settle that can succeed may still take it
    out = await broker.settle(
        [ref(stolen[0])], [PublishRequest("results", b"ok")], settle_id="s-stale", producer="svc"
    )
    assert not out.duplicate


async def test_a_refused_output_means_nothing_is_acked(broker: Broker) -> None:
    await setup(broker)
    await broker.publish(PublishRequest("orders", b"o"))
    [d] = await take(broker, "orders.work")
    with pytest.raises(TopicNotFound):
        await broker.settle(
            [ref(d)], [PublishRequest("no.such.topic", b"x")], settle_id="s-bad", producer="svc"
        )
    await broker.publish(PublishRequest("results", b"a", idempotency_key="k"), producer="svc")
    with pytest.raises(IdempotencyConflict):
        await broker.settle(
            [ref(d)],
            [PublishRequest("results", b"b", idempotency_key="k")],
            settle_id="s-conflict",
            producer="svc",
        )
    await broker.ack(ref(d))  # the delivery was never acked by the failed settles


async def test_a_repeated_settle_returns_the_first_outcome_and_changes_nothing(
    broker: Broker,
) -> None:
    await setup(broker)
    await broker.publish(PublishRequest("orders", b"o"))
    [d] = await take(broker, "orders.work")
    first = await broker.settle(
        [ref(d)], [PublishRequest("results", b"r")], settle_id="s-9", producer="svc"
    )
    again = await broker.settle(
        [ref(d)], [PublishRequest("results", b"r")], settle_id="s-9", producer="svc"
    )
    assert again.duplicate
    assert again.results == first.results
    assert len(await broker.receive("results.work", 10, consumer="c")) == 1
    # settle ids are per producer: another principal's "s-9" is its own
    await broker.publish(PublishRequest("orders", b"o2"))
    [d2] = await take(broker, "orders.work")
    other = await broker.settle([ref(d2)], [], settle_id="s-9", producer="someone-else")
    assert not other.duplicate and other.results == []


async def test_settle_input_is_checked(broker: Broker) -> None:
    await setup(broker)
    with pytest.raises(ValidationError, match="at least one"):
        await broker.settle([], [PublishRequest("results", b"x")], settle_id="s", producer="p")
    await broker.publish(PublishRequest("orders", b"o"))
    [d] = await take(broker, "orders.work")
    with pytest.raises(ValidationError, match="settle_id"):
        await broker.settle([ref(d)], [], settle_id="", producer="p")


async def test_a_settle_id_reused_for_another_settle_conflicts(broker: Broker) -> None:
    await setup(broker)
    await broker.publish(PublishRequest("orders", b"o1"))
    await broker.publish(PublishRequest("orders", b"o2"))
    d1, d2 = await take(broker, "orders.work", 2)
    await broker.settle(
        [ref(d1)], [PublishRequest("results", b"r1")], settle_id="b-7", producer="p"
    )
    with pytest.raises(IdempotencyConflict, match="different settle"):
        await broker.settle(
            [ref(d2)], [PublishRequest("results", b"r2")], settle_id="b-7", producer="p"
        )
    # nothing of the second happened: d2 is still ours, no second output
    await broker.ack(ref(d2))
    assert len(await broker.receive("results.work", 10, consumer="c")) == 1
    # the same inputs with other outputs are another settle too
    await broker.publish(PublishRequest("orders", b"o3"))
    [d3] = await take(broker, "orders.work")
    await broker.settle([ref(d3)], [PublishRequest("results", b"x")], settle_id="b-8", producer="p")
    with pytest.raises(IdempotencyConflict):
        await broker.settle(
            [ref(d3)], [PublishRequest("results", b"y")], settle_id="b-8", producer="p"
        )
