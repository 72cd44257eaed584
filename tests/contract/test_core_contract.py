"""The core's delivery contract (DESIGN §3), run against the in-memory store and PostgreSQL.

Time moves only through the injected ManualClock, so leases, backoff, delays and expiry are
tested without sleeping.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import Delivery, NackRef, PublishRequest, SettleRef
from securebroker.errors import (
    AlreadyExists,
    IdempotencyConflict,
    NotEmpty,
    StaleLease,
    SubscriptionNotFound,
    TopicNotFound,
    ValidationError,
)


async def setup_queue(broker: Broker, topic: str = "payments.authorize", subs: int = 1) -> None:
    await broker.create_topic(topic)
    for i in range(subs):
        await broker.create_subscription(f"{topic}.s{i}", topic, max_attempts=3)


def ref(d: Delivery) -> SettleRef:
    return SettleRef(d.subscription, d.message_id, d.lease_token)


def nref(d: Delivery, error: str = "boom", delay: timedelta | None = None) -> NackRef:
    return NackRef(d.subscription, d.message_id, d.lease_token, error, delay)


SUB = "payments.authorize.s0"


# -- topics and subscriptions
async def test_topic_lifecycle(broker: Broker) -> None:
    await broker.create_topic("orders.created")
    await broker.create_topic("orders.shipped")
    with pytest.raises(AlreadyExists):
        await broker.create_topic("orders.created")
    assert [t.name for t in await broker.list_topics()] == ["orders.created", "orders.shipped"]
    await broker.create_subscription("ledger", "orders.created")
    info = await broker.get_topic("orders.created")
    assert info.subscriptions == ("ledger",)
    with pytest.raises(NotEmpty):
        await broker.delete_topic("orders.created")
    await broker.delete_topic("orders.created", force=True)
    with pytest.raises(TopicNotFound):
        await broker.get_topic("orders.created")
    with pytest.raises(SubscriptionNotFound):
        await broker.get_subscription("ledger")


@pytest.mark.parametrize("name", ["", "a..b", ".a", "a.", "with space", "x" * 256, "ü"])
async def test_invalid_topic_names_rejected(broker: Broker, name: str) -> None:
    with pytest.raises(ValidationError):
        await broker.create_topic(name)


async def test_subscription_lifecycle(broker: Broker) -> None:
    with pytest.raises(TopicNotFound):
        await broker.create_subscription("s", "nope")
    await setup_queue(broker)
    with pytest.raises(AlreadyExists):
        await broker.create_subscription(SUB, "payments.authorize")
    with pytest.raises(ValidationError):
        await broker.create_subscription("bad", "payments.authorize", max_attempts=0)
    subs = await broker.list_subscriptions("payments.authorize")
    assert [s.name for s in subs] == [SUB]
    assert subs[0].settings.max_attempts == 3
    await broker.publish(PublishRequest("payments.authorize", b"x"))
    info = await broker.get_subscription(SUB)
    assert info.counts is not None and info.counts.ready == 1
    with pytest.raises(NotEmpty):
        await broker.delete_subscription(SUB)
    await broker.delete_subscription(SUB, force=True)
    assert await broker.list_subscriptions() == []
    with pytest.raises(TopicNotFound):
        await broker.list_subscriptions("nope")


# -- publish, receive, ack
async def test_point_to_point_roundtrip(broker: Broker) -> None:
    await setup_queue(broker)
    res = await broker.publish(
        PublishRequest(
            "payments.authorize",
            b"\x00card-token\xff",
            attributes={"currency": "EUR"},
            content_type="application/json",
            idempotency_key="order-1",
            trace_context={"traceparent": "00-abc-def-01"},
        ),
        producer="orders-svc",
    )
    assert not res.duplicate and res.message_id.version == 7
    [d] = await broker.receive(SUB, 10, consumer="pay-1")
    assert d.message_id == res.message_id
    assert d.payload == b"\x00card-token\xff"
    assert d.attributes == {"currency": "EUR"}
    assert d.content_type == "application/json"
    assert d.idempotency_key == "order-1"
    assert d.producer == "orders-svc"
    assert d.trace_context == {"traceparent": "00-abc-def-01"}
    assert d.attempt == 1 and d.topic == "payments.authorize"
    assert await broker.receive(SUB, 10) == []  # leased: invisible to others
    await broker.ack(ref(d))
    with pytest.raises(StaleLease):  # acked once, durably; a second ack is refused
        await broker.ack(ref(d))
    assert await broker.receive(SUB, 10) == []


async def test_fan_out_copies_to_every_subscription(broker: Broker) -> None:
    await setup_queue(broker, subs=3)
    res = await broker.publish(PublishRequest("payments.authorize", b"fan"))
    got = {}
    for i in range(3):
        [d] = await broker.receive(f"payments.authorize.s{i}")
        got[i] = d
        assert d.message_id == res.message_id and d.payload == b"fan"
    await broker.ack(ref(got[0]))
    await broker.nack(
        nref(got[1]),
    )
    info = await broker.get_subscription("payments.authorize.s2")
    assert info.counts is not None and info.counts.leased == 1


async def test_publish_to_missing_topic(broker: Broker) -> None:
    with pytest.raises(TopicNotFound):
        await broker.publish(PublishRequest("nope", b"x"))


async def test_receive_preserves_publish_order_without_keys(broker: Broker) -> None:
    await setup_queue(broker)
    ids = [
        r.message_id
        for r in await broker.publish_batch(
            [PublishRequest("payments.authorize", str(i).encode()) for i in range(20)]
        )
    ]
    got = await broker.receive(SUB, 20)
    assert [d.message_id for d in got] == ids


# -- idempotency
async def test_duplicate_publish_returns_original(broker: Broker) -> None:
    await setup_queue(broker)
    req = PublishRequest("payments.authorize", b"pay 10 EUR", idempotency_key="k1")
    first = await broker.publish(req, producer="p")
    again = await broker.publish(req, producer="p")
    assert again.duplicate and again.message_id == first.message_id
    assert len(await broker.receive(SUB, 10)) == 1


async def test_same_key_other_payload_is_conflict_and_stores_nothing(broker: Broker) -> None:
    await setup_queue(broker)
    await broker.publish(PublishRequest("payments.authorize", b"a", idempotency_key="k"))
    with pytest.raises(IdempotencyConflict):
        await broker.publish(PublishRequest("payments.authorize", b"b", idempotency_key="k"))
    with pytest.raises(IdempotencyConflict):  # attributes are part of the message too
        await broker.publish(
            PublishRequest("payments.authorize", b"a", attributes={"x": "1"}, idempotency_key="k")
        )
    assert len(await broker.receive(SUB, 10)) == 1


async def test_idempotency_scoped_by_producer_and_topic(broker: Broker) -> None:
    await setup_queue(broker)
    await setup_queue(broker, topic="orders.created")
    req = PublishRequest("payments.authorize", b"a", idempotency_key="k")
    a = await broker.publish(req, producer="svc-a")
    b = await broker.publish(req, producer="svc-b")
    c = await broker.publish(
        PublishRequest("orders.created", b"a", idempotency_key="k"), producer="svc-a"
    )
    assert not b.duplicate and not c.duplicate
    assert len({a.message_id, b.message_id, c.message_id}) == 3


async def test_idempotency_key_free_again_after_retention(
    broker: Broker, clock: ManualClock
) -> None:
    await setup_queue(broker)
    req = PublishRequest("payments.authorize", b"a", idempotency_key="k")
    first = await broker.publish(req)
    clock.advance(timedelta(days=6, hours=23))
    assert (await broker.publish(req)).duplicate
    clock.advance(timedelta(hours=2))
    later = await broker.publish(req)
    assert not later.duplicate and later.message_id != first.message_id


async def test_batch_is_atomic_and_dedupes_within_itself(broker: Broker) -> None:
    await setup_queue(broker)
    await broker.publish(PublishRequest("payments.authorize", b"old", idempotency_key="taken"))
    with pytest.raises(IdempotencyConflict):
        await broker.publish_batch(
            [
                PublishRequest("payments.authorize", b"new-1", idempotency_key="n1"),
                PublishRequest("payments.authorize", b"other", idempotency_key="taken"),
            ]
        )
    assert len(await broker.receive(SUB, 10)) == 1  # only "old": the batch stored nothing
    res = await broker.publish_batch(
        [
            PublishRequest("payments.authorize", b"x", idempotency_key="d"),
            PublishRequest("payments.authorize", b"x", idempotency_key="d"),
            PublishRequest("payments.authorize", b"old", idempotency_key="taken"),
            PublishRequest("payments.authorize", b"nokey"),
        ]
    )
    assert [r.duplicate for r in res] == [False, True, True, False]
    assert res[0].message_id == res[1].message_id
    with pytest.raises(IdempotencyConflict):
        await broker.publish_batch(
            [
                PublishRequest("payments.authorize", b"y", idempotency_key="e"),
                PublishRequest("payments.authorize", b"z", idempotency_key="e"),
            ]
        )


async def test_cleanup_drops_expired_keys_and_settled_messages(
    broker: Broker, clock: ManualClock
) -> None:
    await setup_queue(broker)
    await broker.publish(PublishRequest("payments.authorize", b"a", idempotency_key="k"))
    [d] = await broker.receive(SUB)
    await broker.ack(ref(d))
    clock.advance(timedelta(days=8))
    result = await broker.cleanup()
    assert result.idempotency_keys == 1
    assert (await broker.cleanup()).idempotency_keys == 0


# -- leases
async def test_lease_expiry_redelivers_and_fences_stale_token(
    broker: Broker, clock: ManualClock
) -> None:
    await setup_queue(broker)
    await broker.publish(PublishRequest("payments.authorize", b"m"))
    [first] = await broker.receive(SUB, lease=timedelta(seconds=10), consumer="c1")
    clock.advance(9)
    assert await broker.receive(SUB) == []
    clock.advance(2)
    [second] = await broker.receive(SUB, consumer="c2")
    assert second.message_id == first.message_id
    assert second.attempt == 2 and second.lease_token != first.lease_token
    with pytest.raises(StaleLease):
        await broker.ack(ref(first))
    with pytest.raises(StaleLease):
        await broker.nack(nref(first))
    with pytest.raises(StaleLease):
        await broker.extend(ref(first), timedelta(seconds=30))
    await broker.ack(ref(second))


async def test_extend_keeps_the_lease(broker: Broker, clock: ManualClock) -> None:
    await setup_queue(broker)
    await broker.publish(PublishRequest("payments.authorize", b"m"))
    [d] = await broker.receive(SUB, lease=timedelta(seconds=10))
    clock.advance(8)
    until = await broker.extend(ref(d), timedelta(seconds=30))
    assert until == clock.now() + timedelta(seconds=30)
    clock.advance(20)
    assert await broker.receive(SUB) == []
    await broker.ack(ref(d))
    with pytest.raises(ValidationError):
        await broker.extend(ref(d), timedelta(hours=13))


async def test_nack_backs_off_exponentially_with_jitter(broker: Broker, clock: ManualClock) -> None:
    await broker.create_topic("t")
    await broker.create_subscription(
        "s",
        "t",
        max_attempts=5,
        backoff_base=timedelta(seconds=4),
        backoff_max=timedelta(seconds=10),
    )
    await broker.publish(PublishRequest("t", b"m"))
    for attempt, full in ((1, 4), (2, 8), (3, 10)):
        [d] = await broker.receive("s")
        assert d.attempt == attempt
        await broker.nack(nref(d))
        clock.advance(full / 2 - 0.01)  # the fixed half of the backoff always applies
        assert await broker.receive("s") == []
        clock.advance(full / 2 + 0.02)  # the whole backoff has passed
    [d] = await broker.receive("s")
    assert d.attempt == 4


async def test_nack_with_explicit_delay(broker: Broker, clock: ManualClock) -> None:
    await setup_queue(broker)
    await broker.publish(PublishRequest("payments.authorize", b"m"))
    [d] = await broker.receive(SUB)
    await broker.nack(nref(d, delay=timedelta(0)))
    [again] = await broker.receive(SUB)
    assert again.attempt == 2
    await broker.nack(nref(again, delay=timedelta(minutes=3)))
    clock.advance(179)
    assert await broker.receive(SUB) == []
    clock.advance(2)
    assert len(await broker.receive(SUB)) == 1


async def test_batch_settle_reports_per_item(broker: Broker) -> None:
    await setup_queue(broker)
    await broker.publish_batch([PublishRequest("payments.authorize", b"%d" % i) for i in range(3)])
    ds = await broker.receive(SUB, 3)
    forged = SettleRef(SUB, ds[1].message_id, uuid.uuid4())
    results = await broker.ack_batch(
        [ref(ds[0]), forged, SettleRef("nope", ds[2].message_id, ds[2].lease_token), ref(ds[0])]
    )
    assert results[0] is None
    assert isinstance(results[1], StaleLease)
    assert isinstance(results[2], SubscriptionNotFound)
    assert isinstance(results[3], StaleLease)
    nacks = await broker.nack_batch(
        [nref(ds[1]), nref(ds[2]), NackRef(SUB, uuid.uuid4(), uuid.uuid4())]
    )
    assert nacks[0] is None and nacks[1] is None and isinstance(nacks[2], StaleLease)


# -- dead letters
async def test_max_attempts_dead_letters_with_history_and_redrive_once(
    broker: Broker, clock: ManualClock
) -> None:
    await setup_queue(broker)  # max_attempts=3
    res = await broker.publish(
        PublishRequest("payments.authorize", b"poison", idempotency_key="p-1")
    )
    for i in range(3):
        [d] = await broker.receive(SUB, consumer=f"c{i}")
        await broker.nack(nref(d, error=f"failure {i}", delay=timedelta(0)))
    assert await broker.receive(SUB) == []
    [dead] = await broker.list_dead(SUB)
    assert dead.message_id == res.message_id
    assert dead.idempotency_key == "p-1"
    assert dead.attempts == 3 and dead.reason == "max_attempts"
    assert dead.last_error == "failure 2"
    assert [h["outcome"] for h in dead.history] == ["nacked"] * 3
    assert [h["error"] for h in dead.history] == ["failure 0", "failure 1", "failure 2"]
    assert [h["consumer"] for h in dead.history] == ["c0", "c1", "c2"]
    info = await broker.get_subscription(SUB)
    assert info.counts is not None and info.counts.dead == 1

    assert await broker.redrive(SUB) == 1
    assert await broker.redrive(SUB) == 0  # brought back once
    [d] = await broker.receive(SUB, 10)
    assert d.message_id == res.message_id and d.attempt == 1
    await broker.ack(ref(d))
    assert await broker.receive(SUB, 10) == []
    assert await broker.list_dead(SUB) == []


async def test_lease_expiry_on_last_attempt_dead_letters(
    broker: Broker, clock: ManualClock
) -> None:
    await setup_queue(broker)
    await broker.publish(PublishRequest("payments.authorize", b"slow"))
    for attempt in range(1, 4):
        [d] = await broker.receive(SUB, lease=timedelta(seconds=5), consumer="slowpoke")
        assert d.attempt == attempt
        clock.advance(6)
    assert await broker.receive(SUB) == []
    swept = await broker.sweep()
    assert swept.exhausted == 1
    [dead] = await broker.list_dead(SUB)
    assert dead.reason == "max_attempts" and dead.last_error == "lease expired"
    assert [h["outcome"] for h in dead.history] == ["lease_expired"] * 3


async def test_redrive_selected_ids_only(broker: Broker) -> None:
    await setup_queue(broker)
    await broker.publish_batch([PublishRequest("payments.authorize", b"%d" % i) for i in range(2)])
    for _ in range(3):
        for d in await broker.receive(SUB, 10):
            await broker.nack(nref(d, delay=timedelta(0)))
    dead = await broker.list_dead(SUB)
    assert len(dead) == 2
    assert await broker.redrive(SUB, [dead[0].message_id]) == 1
    [d] = await broker.receive(SUB, 10)
    assert d.message_id == dead[0].message_id
    page = await broker.list_dead(SUB, limit=1)
    assert [p.message_id for p in page] == [dead[1].message_id]
    assert await broker.list_dead(SUB, after=dead[1].message_id) == []


# -- ordering, scheduling, expiry
async def test_ordering_key_one_in_flight_in_publish_order(broker: Broker) -> None:
    await setup_queue(broker)
    reqs = [
        PublishRequest("payments.authorize", f"{k}{i}".encode(), ordering_key=k)
        for i in range(3)
        for k in ("A", "B")
    ]
    await broker.publish_batch(reqs)
    await broker.publish(PublishRequest("payments.authorize", b"free"))
    first = await broker.receive(SUB, 10)
    assert sorted(d.payload for d in first) == [b"A0", b"B0", b"free"]
    a0 = next(d for d in first if d.payload == b"A0")
    b0 = next(d for d in first if d.payload == b"B0")
    await broker.nack(nref(a0, delay=timedelta(0)))
    [again] = await broker.receive(SUB, 10)  # A0 comes back before A1 may go
    assert again.payload == b"A0" and again.attempt == 2
    await broker.ack(ref(again))
    await broker.ack(ref(b0))
    nxt = await broker.receive(SUB, 10)
    assert sorted(d.payload for d in nxt) == [b"A1", b"B1"]


async def test_dead_lettered_head_unblocks_its_group(broker: Broker) -> None:
    await setup_queue(broker)
    await broker.publish_batch(
        [PublishRequest("payments.authorize", b"%d" % i, ordering_key="K") for i in range(2)]
    )
    for _ in range(3):
        [d] = await broker.receive(SUB, 10)
        assert d.payload == b"0"
        await broker.nack(nref(d, delay=timedelta(0)))
    [d] = await broker.receive(SUB, 10)
    assert d.payload == b"1"


async def test_delayed_delivery(broker: Broker, clock: ManualClock) -> None:
    await setup_queue(broker)
    await broker.publish(
        PublishRequest(
            "payments.authorize", b"later", not_before=clock.now() + timedelta(minutes=5)
        )
    )
    assert await broker.receive(SUB) == []
    info = await broker.get_subscription(SUB)
    assert info.counts is not None and info.counts.delayed == 1 and info.counts.ready == 0
    clock.advance(timedelta(minutes=5))
    [d] = await broker.receive(SUB)
    assert d.payload == b"later"


async def test_expired_message_is_dead_lettered_not_dropped(
    broker: Broker, clock: ManualClock
) -> None:
    await setup_queue(broker)
    await broker.publish(
        PublishRequest(
            "payments.authorize", b"stale", expires_at=clock.now() + timedelta(seconds=30)
        )
    )
    clock.advance(31)
    assert await broker.receive(SUB) == []
    assert (await broker.sweep()).expired == 1
    [dead] = await broker.list_dead(SUB)
    assert dead.reason == "expired"
    assert await broker.redrive(SUB) == 1  # an operator's redrive lifts the expiry
    [d] = await broker.receive(SUB)
    assert d.payload == b"stale"


async def test_purge(broker: Broker) -> None:
    await setup_queue(broker)
    await broker.publish_batch([PublishRequest("payments.authorize", b"%d" % i) for i in range(4)])
    for _ in range(3):
        [d] = await broker.receive(SUB)
        assert d.payload == b"0"
        await broker.nack(nref(d, delay=timedelta(0)))
    assert len(await broker.list_dead(SUB)) == 1
    assert len(await broker.receive(SUB)) == 1  # one leased, two ready: purge takes all three
    assert await broker.purge(SUB) == 3
    assert await broker.receive(SUB, 10) == []
    assert len(await broker.list_dead(SUB)) == 1
    assert await broker.purge(SUB, dead=True) == 1
    assert await broker.list_dead(SUB) == []


# -- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"payload": b"x" * (1_048_576 + 1)}, "payload"),
        ({"attributes": {f"k{i}": "v" for i in range(65)}}, "attributes"),
        ({"attributes": {"k": "v" * 1025}}, "attributes"),
        ({"attributes": {"": "v"}}, "attributes"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"ordering_key": "k" * 256}, "ordering_key"),
        ({"content_type": ""}, "content_type"),
        ({"topic": "bad topic"}, "topic"),
    ],
)
async def test_publish_validation(broker: Broker, kwargs: dict[str, object], message: str) -> None:
    await setup_queue(broker)
    fields: dict[str, object] = {"topic": "payments.authorize", "payload": b"ok"} | kwargs
    with pytest.raises(ValidationError, match=message):
        await broker.publish(PublishRequest(**fields))  # type: ignore[arg-type]
    assert await broker.receive(SUB) == []


async def test_publish_time_validation(broker: Broker, clock: ManualClock) -> None:
    await setup_queue(broker)
    with pytest.raises(ValidationError, match="past"):
        await broker.publish(PublishRequest("payments.authorize", b"x", expires_at=clock.now()))
    with pytest.raises(ValidationError, match="earlier"):
        await broker.publish(
            PublishRequest(
                "payments.authorize",
                b"x",
                not_before=clock.now() + timedelta(hours=2),
                expires_at=clock.now() + timedelta(hours=1),
            )
        )
    with pytest.raises(ValidationError, match="timezone"):
        await broker.publish(
            PublishRequest("payments.authorize", b"x", not_before=datetime(2030, 1, 1))
        )
    with pytest.raises(ValidationError, match="batch"):
        await broker.publish_batch([PublishRequest("payments.authorize", b"x")] * 1001)


async def test_receive_validation(broker: Broker) -> None:
    await setup_queue(broker)
    with pytest.raises(SubscriptionNotFound):
        await broker.receive("nope")
    with pytest.raises(ValidationError):
        await broker.receive(SUB, 0)
    with pytest.raises(ValidationError):
        await broker.receive(SUB, lease=timedelta(milliseconds=10))
    with pytest.raises(ValidationError):
        await broker.nack(NackRef(SUB, uuid.uuid4(), uuid.uuid4(), delay=timedelta(seconds=-1)))
