"""Group commit's one-statement path (``sb_publish_group``, migration 0005): a group of fresh
messages commits in one statement with its audit records; anything else (a claimed key, a key
repeated in the group, a missing topic) leaves nothing behind and takes the general path."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from securebroker.audit.checkpoint import SigningKey
from securebroker.audit.log import AuditLog, record_of
from securebroker.audit.log import Q as AUDIT_Q
from securebroker.audit.record import Actor, recompute
from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import PublishRequest, SettleRef
from securebroker.errors import StaleLease, TopicNotFound, Unavailable
from securebroker.store.group import GroupCommitStore
from securebroker.store.postgres import PostgresStore, ordering_lock_key
from securebroker.store.sql import QUERIES as Q
from tests.conftest import FP_KEY, POISON_TRIGGER

ALICE = Actor(certificate="spiffe://pay/alice", subject="alice", address="10.0.0.1:5000",
              protocol="native")  # fmt: skip
BOB = Actor(certificate="spiffe://pay/bob", subject=None, address="10.0.0.2:5001",
            protocol="native")  # fmt: skip


@dataclass
class Grouped:
    broker: Broker
    store: GroupCommitStore
    db: asyncpg.Connection


@pytest.fixture(params=["audit", "no-audit"])
async def grouped(
    request: pytest.FixtureRequest, pg_dsn: str, clock: ManualClock
) -> AsyncIterator[Grouped]:
    store = await GroupCommitStore.connect_group(pg_dsn, min_size=2, max_size=10, committers=1)
    audit = None
    if request.param == "audit":
        audit = AuditLog(
            store.pool, signer=SigningKey.generate(), clock=clock, checkpoint_interval=3600
        )
        await audit.start()
        store.audit = audit
    broker = Broker(store, fingerprint_key=FP_KEY, clock=clock, rng=random.Random(5))
    await broker.create_topic("t")
    await broker.create_subscription("s", "t")
    await broker.create_subscription("s2", "t")
    db = await asyncpg.connect(pg_dsn)
    try:
        yield Grouped(broker, store, db)
    finally:
        await db.close()
        if audit is not None:
            await audit.close()
        await store.close()


async def counts(db: asyncpg.Connection) -> tuple[int, int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM sb_messages), (SELECT count(*) FROM sb_deliveries),"
        " (SELECT count(*) FROM sb_idempotency)"
    )
    assert row is not None
    return row[0], row[1], row[2]


async def test_fresh_messages_commit_in_one_statement(grouped: Grouped) -> None:
    g = grouped
    reqs = [PublishRequest("t", b"m%d" % i, idempotency_key=f"k{i}") for i in range(50)]
    reqs += [PublishRequest("t", b"unkeyed", ordering_key="acct-1") for _ in range(5)]
    results = await g.broker.publish_batch(reqs, actor=ALICE)
    assert [r.duplicate for r in results] == [False] * 55
    assert (g.store.stats.single_statement, g.store.stats.general) == (1, 0)
    assert await counts(g.db) == (55, 110, 50)  # two subscriptions; unkeyed: no claim
    rows = await g.db.fetch(
        "SELECT d.message_id, d.seq, d.available_at, d.ordering_key, m.published_at"
        " FROM sb_deliveries d JOIN sb_messages m ON m.id = d.message_id"
        " WHERE d.subscription_id = (SELECT id FROM sb_subscriptions WHERE name = 's')"
        " ORDER BY d.seq"
    )
    assert [r["message_id"] for r in rows] == [r.message_id for r in results]  # publish order
    assert all(r["available_at"] == r["published_at"] for r in rows)
    assert [r["ordering_key"] for r in rows][-5:] == ["acct-1"] * 5
    got = await g.broker.receive("s", 100)
    assert [d.payload for d in got] == [*(r.payload for r in reqs[:50]), b"unkeyed"]  # one per key


async def test_a_claimed_key_rolls_back_the_statement_and_the_group_goes_the_general_way(
    grouped: Grouped,
) -> None:
    g = grouped
    first = await g.broker.publish(PublishRequest("t", b"original", idempotency_key="taken"))
    assert (g.store.stats.single_statement, g.store.stats.general) == (1, 0)
    reqs = [PublishRequest("t", b"m%d" % i, idempotency_key=f"k{i}") for i in range(10)]
    reqs.insert(4, PublishRequest("t", b"original", idempotency_key="taken"))
    results = await g.broker.publish_batch(reqs)
    assert (g.store.stats.single_statement, g.store.stats.general) == (1, 1)
    assert results[4].duplicate and results[4].message_id == first.message_id
    assert [r.duplicate for i, r in enumerate(results) if i != 4] == [False] * 10
    # the refused statement kept nothing: each message, delivery and claim exactly once
    assert await counts(g.db) == (11, 22, 11)
    claims = await g.db.fetch("SELECT key, message_id FROM sb_idempotency ORDER BY key")
    expected = {"taken": first.message_id} | {
        f"k{i}": r.message_id for i, r in enumerate(r for j, r in enumerate(results) if j != 4)
    }
    assert {c["key"]: c["message_id"] for c in claims} == expected


async def test_a_key_repeated_in_the_group_takes_the_general_path(grouped: Grouped) -> None:
    g = grouped
    req = PublishRequest("t", b"same", idempotency_key="k")
    results = await g.broker.publish_batch([req, PublishRequest("t", b"x"), req])
    assert (g.store.stats.single_statement, g.store.stats.general) == (0, 1)
    assert results[2].duplicate and results[2].message_id == results[0].message_id
    assert await counts(g.db) == (2, 4, 1)


async def test_a_missing_topic_fails_only_its_own_request(grouped: Grouped) -> None:
    g = grouped
    results = await g.broker.publish_batch([PublishRequest("t", b"before")])
    with pytest.raises(TopicNotFound):
        await g.broker.publish_batch([PublishRequest("t", b"x"), PublishRequest("nope", b"y")])
    assert g.store.stats.general == 1
    assert await counts(g.db) == (1, 2, 0)
    assert len(results) == 1


async def test_a_failed_statement_confirms_nothing_and_keeps_nothing(grouped: Grouped) -> None:
    g = grouped
    await g.db.execute(POISON_TRIGGER)
    reqs = [PublishRequest("t", b"fine", idempotency_key=f"k{i}") for i in range(5)]
    reqs.insert(2, PublishRequest("t", b"poison", idempotency_key="p"))
    with pytest.raises(Unavailable):
        await g.broker.publish_batch(reqs)
    assert await counts(g.db) == (0, 0, 0)  # not even the claims
    if g.store.audit is not None:
        assert await published_records(g.db) == 0
        before = await chains_verify(g.db)
        # the lane did not move: the next group links to the head before the failure
        await g.db.execute("DROP TRIGGER poison ON sb_messages")
        await g.broker.publish_batch([PublishRequest("t", b"after")], actor=ALICE)
        assert await chains_verify(g.db) == before + 1
        assert await published_records(g.db) == 1


async def published_records(db: asyncpg.Connection) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM sb_audit WHERE event IN ('published', 'deduplicated')"
    )
    return n


async def chains_verify(db: asyncpg.Connection) -> int:
    """Every stored record hashes to its ``hash`` and links to the one before; returns the
    number of records."""
    rows = [record_of(r) for r in await db.fetch("SELECT * FROM sb_audit ORDER BY chain, seq")]
    prev: dict[int, bytes] = {}
    for r in rows:
        assert recompute(r) == r.hash, r
        if r.chain in prev:
            assert r.prev_hash == prev[r.chain], r
        prev[r.chain] = r.hash
    return len(rows)


@pytest.mark.parametrize("grouped", ["audit"], indirect=True)
async def test_audit_records_of_the_statement_match_the_general_path(
    grouped: Grouped, clock: ManualClock
) -> None:
    g = grouped
    ctx = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    # one group, two actors (the statement takes distinct actors by index)
    jobs = [
        g.store.submit_publish(
            g.broker._prepare_all(
                [PublishRequest("t", b"a%d" % i, trace_context=ctx if i == 0 else {})],
                "alice",
                None,
                None,
                ALICE,
            ),
            g.broker.settings.idempotency_retention,
        )
        for i in range(3)
    ] + [
        g.store.submit_publish(
            g.broker._prepare_all([PublishRequest("t", b"b")], "bob", None, None, BOB),
            g.broker.settings.idempotency_retention,
        )
    ]
    fast = [r for rs in await asyncio.gather(*jobs) for r in rs]
    # the same publishes on the general path (a repeated key forces it)
    clock.advance(1)
    req = PublishRequest("t", b"slow", idempotency_key="k", trace_context=ctx)
    slow = await g.broker.publish_batch([req, req], actor=BOB)
    assert g.store.stats.single_statement >= 1 and g.store.stats.general == 1
    await chains_verify(g.db)
    # one "published" batch per actor (ADR 0013) on both paths: alice's 3 and bob's 1 on the
    # statement, bob's 1 on the general path, whose duplicate has a record of its own
    assert await published_records(g.db) == 4
    rows = await g.db.fetch("SELECT * FROM sb_audit WHERE event = 'published' ORDER BY chain, seq")
    assert sorted(len(r["message_ids"]) for r in rows) == [1, 1, 3]
    recs = {}  # message id -> (its record, its trace id)
    for r in rows:
        assert r["message_id"] is None and r["trace_id"] is None
        assert len(r["trace_ids"]) == len(r["message_ids"])
        for mid, trace in zip(r["message_ids"], r["trace_ids"], strict=True):
            recs[mid] = (r, trace)
    # alice's record lists her messages in the order she published them
    assert recs[fast[0].message_id][0]["message_ids"] == [x.message_id for x in fast[:3]]
    for res, actor in zip(fast, [ALICE, ALICE, ALICE, BOB], strict=True):
        r = recs[res.message_id][0]
        assert (r["actor_cert"], r["actor_sub"], r["origin_addr"], r["origin_proto"]) == (
            actor.certificate,
            actor.subject,
            actor.address,
            actor.protocol,
        )
        assert (r["topic"], r["outcome"], r["subscription"], r["key_id"], r["detail"]) == (
            "t",
            "success",
            None,
            None,
            None,
        )
    assert recs[fast[0].message_id][1] == recs[slow[0].message_id][1]
    assert recs[fast[0].message_id][1] == "0af7651916cd43dd8448eb211c80319c"
    assert recs[fast[1].message_id][1] is None
    # time and sequence: one chain, in order, times never going back
    chain = [
        r
        for r in await g.db.fetch("SELECT chain, seq, at FROM sb_audit ORDER BY chain, seq")
        if r["chain"] == recs[fast[0].message_id][0]["chain"]
    ]
    assert [r["seq"] for r in chain] == list(range(1, len(chain) + 1))
    assert all(a["at"] <= b["at"] for a, b in itertools.pairwise(chain))
    assert all(r["at"] >= datetime(2000, 1, 1, tzinfo=UTC) for r in chain)
    assert isinstance(fast[0].message_id, uuid.UUID)


async def test_acks_that_hold_their_leases_commit_in_one_statement(grouped: Grouped) -> None:
    g = grouped
    await g.broker.publish_batch([PublishRequest("t", b"%d" % i) for i in range(20)])
    ds = await g.broker.receive("s", 20)
    refs = [SettleRef(d.subscription, d.message_id, d.lease_token, actor=BOB) for d in ds]
    assert await g.broker.ack_batch(refs) == [None] * 20
    assert g.store.stats.single_statement_acks == 1
    # acked in "s" only: the messages stay for "s2"; then "s2" acks and they are gone
    assert await counts(g.db) == (20, 20, 0)
    ds2 = await g.broker.receive("s2", 20)
    refs2 = [SettleRef(d.subscription, d.message_id, d.lease_token, actor=BOB) for d in ds2]
    assert await g.broker.ack_batch(refs2) == [None] * 20
    assert g.store.stats.single_statement_acks == 2
    assert await counts(g.db) == (0, 0, 0)
    if g.store.audit is not None:
        await chains_verify(g.db)
        rows = await g.db.fetch(
            "SELECT message_ids, trace_ids, message_id, topic, subscription, actor_cert,"
            " actor_sub, origin_addr, origin_proto, outcome, trace_id, detail FROM sb_audit"
            " WHERE event = 'acked' ORDER BY subscription"
        )
        # one batch record per consumer and subscription, listing its acks in their order
        assert [(r["message_ids"], r["trace_ids"]) for r in rows] == [
            ([d.message_id for d in ds], [None] * 20),
            ([d.message_id for d in ds2], [None] * 20),
        ]
        assert [dict(r) | {"message_ids": 0, "trace_ids": 0} for r in rows] == [
            {
                "message_ids": 0,
                "trace_ids": 0,
                "message_id": None,
                "topic": "t",
                "subscription": sub,
                "actor_cert": BOB.certificate,
                "actor_sub": None,
                "origin_addr": BOB.address,
                "origin_proto": BOB.protocol,
                "outcome": "success",
                "trace_id": None,
                "detail": None,
            }
            for sub in ("s", "s2")
        ]


async def test_a_stale_ack_rolls_back_the_statement_and_each_ack_gets_its_own_answer(
    grouped: Grouped,
) -> None:
    g = grouped
    await g.broker.publish_batch([PublishRequest("t", b"%d" % i) for i in range(5)])
    ds = await g.broker.receive("s", 5)
    refs = [SettleRef(d.subscription, d.message_id, d.lease_token) for d in ds]
    assert await g.broker.ack_batch(refs[:1]) == [None]
    results = await g.broker.ack_batch(refs)  # the first is now stale
    assert isinstance(results[0], StaleLease)
    assert results[1:] == [None] * 4
    assert g.store.stats.single_statement_acks == 1  # the second group went the general way
    assert (
        await g.db.fetchval(
            "SELECT count(*) FROM sb_deliveries WHERE subscription_id ="
            " (SELECT id FROM sb_subscriptions WHERE name = 's')"
        )
        == 0
    )
    if g.store.audit is not None:
        await chains_verify(g.db)
        acked = await g.db.fetchval(
            "SELECT array_agg(cardinality(message_ids)) FROM sb_audit WHERE event = 'acked'"
        )
        # a batch per ack group that took effect (the first, then the general path's four),
        # nothing of the refused statement
        assert sorted(acked) == [1, 4]


# -- regressions found in review ----------------------------------------------------------------


async def test_a_topic_deleted_elsewhere_loses_no_audit_record(
    pg_dsn: str, clock: ManualClock
) -> None:
    """The audit records carry the names that were hashed; none is looked up in the statement,
    so a topic deleted by another broker (this one still has its id cached) cannot drop one
    and break the chain."""
    store = await GroupCommitStore.connect_group(pg_dsn, min_size=1, max_size=10, committers=1)
    audit = AuditLog(store.pool, signer=SigningKey.generate(), clock=clock, checkpoint_interval=60)
    await audit.start()
    store.audit = audit
    broker = Broker(store, fingerprint_key=FP_KEY, clock=clock, rng=random.Random(5))
    other = await PostgresStore.connect(pg_dsn, min_size=1, max_size=2)
    db = await asyncpg.connect(pg_dsn)
    try:
        await broker.create_topic("t")
        await broker.create_topic("u")
        await broker.create_subscription("su", "u")
        await broker.publish_batch([PublishRequest("t", b"warm")], actor=ALICE)  # caches t
        await broker.publish_batch([PublishRequest("u", b"warm")], actor=ALICE)
        await other.delete_topic("t", force=True, now=clock.now())
        await broker.publish_batch(
            [PublishRequest("t", b"x"), PublishRequest("u", b"y")], actor=ALICE
        )
        await broker.publish_batch([PublishRequest("u", b"z")], actor=ALICE)
        assert await published_records(db) == 5
        await chains_verify(db)
    finally:
        await db.close()
        await other.close()
        await audit.close()
        await store.close()


async def test_the_first_group_on_a_pool_of_one_does_not_wait_for_itself(
    pg_dsn: str, clock: ManualClock
) -> None:
    """A new lane may need a connection to create its chain: the lane is taken before the
    group's connection, as every audited transaction does."""
    store = await GroupCommitStore.connect_group(pg_dsn, min_size=1, max_size=1, committers=1)
    audit = AuditLog(store.pool, signer=SigningKey.generate(), clock=clock, checkpoint_interval=60)
    await audit.start()
    store.audit = audit
    broker = Broker(store, fingerprint_key=FP_KEY, clock=clock, rng=random.Random(5))
    try:
        await broker.create_topic("t")
        audit.connection_lost()  # retire the lane: the next group must create one
        async with asyncio.timeout(60):  # a bound on a hang, not a speed check
            result = await broker.publish_batch([PublishRequest("t", b"x")], actor=ALICE)
        assert not result[0].duplicate
        assert store.stats.single_statement == 1
    finally:
        await store.close()
        await audit.close()


async def test_a_retry_on_the_general_path_and_its_original_in_a_group_do_not_deadlock(
    pg_dsn: str, clock: ManualClock
) -> None:
    """Both paths take the idempotency claims first and the ordering-key locks after, so a
    retried message (same key, same ordering key) in each can only wait, never deadlock."""
    store = await GroupCommitStore.connect_group(pg_dsn, min_size=1, max_size=4, committers=1)
    broker = Broker(store, fingerprint_key=FP_KEY, clock=clock, rng=random.Random(5))
    general = await asyncpg.connect(pg_dsn)
    try:
        await broker.create_topic("t")
        tid = await general.fetchval("SELECT id FROM sb_topics WHERE name = 't'")
        req = PublishRequest("t", b"pay", idempotency_key="K", ordering_key="acct")
        original = broker.prepare(req, producer="p", scope=None, now=clock.now())
        retry = broker.prepare(req, producer="p", scope=None, now=clock.now())
        # the retry on the general path: publish_in's statements, in its order
        await general.execute("BEGIN")
        await general.fetch(
            Q["idem_claim"], [tid], ["p"], ["K"], [retry.id], [retry.fingerprint],
            [retry.published_at],
        )  # fmt: skip
        fast = asyncio.ensure_future(store.publish_group([original]))
        assert await blocked_on_a_lock(pg_dsn, fast)
        await general.fetchval(Q["ordering_lock"], [ordering_lock_key(tid, "acct")])
        await general.execute("COMMIT")
        assert await fast is None  # the key was claimed: the group goes the general way
    finally:
        await general.close()
        await store.close()


async def blocked_on_a_lock(dsn: str, fast: asyncio.Future[Any]) -> bool:
    """True once the group's statement waits for a lock (bounded polling of pg_stat_activity
    from a connection of its own, outside any transaction: a condition, not a timing)."""
    observer = await asyncpg.connect(dsn)
    try:
        for _ in range(2000):
            if fast.done():
                return False
            n = await observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%sb_publish_group%'"
            )
            if n:
                return True
            await asyncio.sleep(0.01)
        return False
    finally:
        await observer.close()


async def test_empty_groups_are_answered_and_the_committers_live_on(grouped: Grouped) -> None:
    g = grouped
    assert await g.broker.ack_batch([]) == []
    assert await g.store.publish_group([]) == []
    await g.broker.publish_batch([PublishRequest("t", b"x")])
    ds = await g.broker.receive("s", 1)
    assert await g.broker.ack_batch([SettleRef("s", ds[0].message_id, ds[0].lease_token)]) == [None]


@pytest.mark.parametrize("grouped", ["audit"], indirect=True)
async def test_a_connection_lost_mid_statement_retires_the_lane(
    grouped: Grouped, pg_dsn: str
) -> None:
    """The group's backend terminated while its statement runs leaves the outcome unknown to
    the broker: every request fails unconfirmed and the lane is retired, so no later record
    can link to one that may or may not exist."""
    g = grouped
    assert g.store.audit is not None
    holder = await asyncpg.connect(pg_dsn)
    try:
        await holder.execute("BEGIN")
        await holder.execute("LOCK TABLE sb_messages IN EXCLUSIVE MODE")
        pending = asyncio.ensure_future(
            g.broker.publish_batch([PublishRequest("t", b"x", idempotency_key="k")])
        )
        assert await blocked_on_a_lock(pg_dsn, pending)
        await g.db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE '%sb_publish_group%' AND wait_event_type = 'Lock'"
        )
        with pytest.raises(Unavailable):
            await pending
        await holder.execute("ROLLBACK")
    finally:
        await holder.close()
    assert g.store.stats.single_statement == 0
    assert all(lane.retired for lane in g.store.audit._lanes.values())
    # the retry (same key) is published once, on a new chain, and every chain verifies
    result = await g.broker.publish_batch([PublishRequest("t", b"x", idempotency_key="k")])
    assert not result[0].duplicate
    assert await published_records(g.db) == 1
    await chains_verify(g.db)


AUDIT_APPEND = (
    "SELECT sb_audit_append(99, 0, $1, 'published', $2, $3, $4, $5, $6, $7,"
    " ARRAY['c'], ARRAY[NULL], ARRAY['a'], ARRAY['native'], ARRAY['t'], ARRAY[NULL])"
)


@pytest.mark.parametrize(
    ("counts_", "traces"),
    [([2], 3), ([1, 3], 3), ([0, 3], 3), ([3], 2), ([1, None], 3)],
    ids=["too-few", "too-many", "empty-record", "traces-short", "null-count"],
)
async def test_batch_records_that_do_not_cover_the_group_are_refused(
    grouped: Grouped, counts_: list[int | None], traces: int
) -> None:
    """The statement refuses batch records that leave a message unrecorded, name one twice,
    or misalign its trace ids (ADR 0013): a group is recorded whole or not at all."""
    g = grouped
    ids = [uuid.uuid4() for _ in range(3)]
    n = len(counts_)
    with pytest.raises(asyncpg.RaiseError, match="do not cover"):
        await g.db.execute(
            AUDIT_APPEND, b"p", ids, [None] * traces, [datetime.now(UTC)] * n, [1] * n,
            counts_, [b"h%d" % i for i in range(n)],
        )  # fmt: skip
    assert await g.db.fetchval("SELECT count(*) FROM sb_audit WHERE chain = 99") == 0
    # the same group, covered exactly: one row per record, each with its slice of the group
    await g.db.execute(
        AUDIT_APPEND, b"p", ids, [None, "x", None], [datetime.now(UTC)] * 2, [1, 1], [1, 2],
        [b"h1", b"h2"],
    )  # fmt: skip
    rows = await g.db.fetch(
        "SELECT seq, message_ids, trace_ids, prev_hash, hash FROM sb_audit WHERE chain = 99"
        " ORDER BY seq"
    )
    assert [tuple(r) for r in rows] == [
        (1, ids[:1], [None], b"p", b"h1"),
        (2, ids[1:], ["x", None], b"h1", b"h2"),
    ]
    # no trace ids at all: the broker sends NULL, each record stores its NULLs, aligned
    await g.db.execute(
        AUDIT_APPEND.replace("99, 0", "98, 0"), b"p", ids, None, [datetime.now(UTC)], [1], [3],
        [b"h"],
    )  # fmt: skip
    stored = await g.db.fetchrow("SELECT message_ids, trace_ids FROM sb_audit WHERE chain = 98")
    assert stored is not None and tuple(stored) == (ids, [None] * 3)


@pytest.mark.parametrize("grouped", ["audit"], indirect=True)
async def test_the_trail_finds_a_message_inside_a_batch_record(grouped: Grouped) -> None:
    g = grouped
    results = await g.broker.publish_batch(
        [PublishRequest("t", b"%d" % i) for i in range(10)], actor=ALICE
    )
    assert g.store.audit is not None
    trail = await g.store.audit.trail(results[6].message_id)
    assert [(r.event, r.messages()) for r in trail] == [
        ("published", tuple(str(r.message_id) for r in results))
    ]
    assert recompute(trail[0]) == trail[0].hash
    # through the array index, not a scan of the log
    await g.db.execute("SET enable_seqscan = off")
    plan = "\n".join(
        r[0]
        for r in await g.db.fetch("EXPLAIN " + AUDIT_Q["audit_trail"], results[6].message_id, 10)
    )
    assert "message_ids_idx" in plan and "Seq Scan" not in plan, plan


@pytest.mark.parametrize("grouped", ["audit"], indirect=True)
async def test_a_lease_records_one_delivered_batch_per_attempt(
    grouped: Grouped, clock: ManualClock
) -> None:
    g = grouped
    results = await g.broker.publish_batch([PublishRequest("t", b"%d" % i) for i in range(5)])
    ids = [r.message_id for r in results]
    first = await g.broker.receive("s", 3, actor=BOB)
    clock.advance(3600)  # the three leases run out
    again = await g.broker.receive("s", 5, actor=BOB)
    assert sorted(d.message_id for d in again) == sorted(ids)
    await chains_verify(g.db)
    rows = await g.db.fetch(
        "SELECT event, message_id, message_ids, detail::jsonb->>'attempt' AS attempt"
        " FROM sb_audit WHERE event IN ('delivered', 'lease_expired') ORDER BY chain, seq"
    )
    got = [(r["event"], r["message_id"], r["message_ids"], r["attempt"]) for r in rows]
    leased = [d.message_id for d in first]
    second = {d.message_id: d.attempt for d in again}
    assert got[0] == ("delivered", None, leased, "1")
    # the second lease: each expired lease on its own, then a batch per attempt number
    expired = [x for x in got[1:] if x[0] == "lease_expired"]
    assert sorted(x[1] for x in expired) == sorted(leased)
    assert got[1 : 1 + len(expired)] == expired
    batches = {x[3]: x[2] for x in got[1 + len(expired) :]}
    assert set(batches) == {"1", "2"} and all(x[0] == "delivered" for x in got[4:])
    assert sorted(batches["2"]) == sorted(m for m, a in second.items() if a == 2)
    assert sorted(batches["1"]) == sorted(m for m, a in second.items() if a == 1)


@pytest.mark.parametrize(
    ("counts_", "records"),
    [([1, 2], 1), ([3], 2)],
    ids=["more-counts-than-records", "fewer-counts-than-records"],
)
@pytest.mark.parametrize("grouped", ["no-audit"], indirect=True)
async def test_batch_records_whose_arrays_do_not_align_are_refused(
    grouped: Grouped, counts_: list[int], records: int
) -> None:
    """The coverage check must hold whatever the arrays' lengths: per-record arrays of
    different lengths (unnest pads the shorter with NULLs) must not let a group be kept with
    messages that no record lists, or with a record that lists none."""
    g = grouped
    ids = [uuid.uuid4() for _ in range(3)]
    with pytest.raises(asyncpg.PostgresError):
        await g.db.execute(
            AUDIT_APPEND, b"p", ids, [None] * 3, [datetime.now(UTC)] * records, [1] * records,
            counts_, [b"h%d" % i for i in range(records)],
        )  # fmt: skip
    rows = await g.db.fetch("SELECT message_ids, trace_ids FROM sb_audit WHERE chain = 99")
    assert rows == []
