"""The PostgreSQL store on asyncpg: every port method is one transaction.

Batch forms pass arrays to ``unnest`` so a batch of any size costs a fixed number of round
trips. Commits use ``synchronous_commit = on``: when a method returns, the change is on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias, TypeVar

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from securebroker.audit import events as ae
from securebroker.audit.log import CONNECTION_ERRORS, AuditLog, Lane, Row
from securebroker.audit.log import Outcome as TxOutcome
from securebroker.audit.record import BROKER, Actor, AuditEvent, Event, Outcome
from securebroker.core.model import (
    CleanupResult,
    DeadLetter,
    DeadReason,
    Delivery,
    DeliveryState,
    NackRef,
    PreparedMessage,
    PublishResult,
    SettleOutcome,
    SettleRef,
    SubscriptionCounts,
    SubscriptionInfo,
    SubscriptionSettings,
    SweepResult,
    TopicInfo,
)
from securebroker.core.ports import RetryPolicy
from securebroker.errors import (
    AlreadyExists,
    BrokerError,
    IdempotencyConflict,
    NotEmpty,
    StaleLease,
    SubscriptionNotFound,
    TopicNotFound,
    Unavailable,
)
from securebroker.store.memory import STALE
from securebroker.store.sql import QUERIES as Q

T = TypeVar("T")

#: Failures that come from the database or the connection to it (outcome possibly unknown).
#: ``InternalClientError``: asyncpg's state error when a connection the server cut is reused.
DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)

#: how long a name -> id lookup is trusted before it is read again (other broker processes
#: may delete and recreate topics and subscriptions).
NAME_TTL = 5.0

Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


async def _init_connection(conn: Conn) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda v: _json_encode(v).decode(),
        decoder=_json_decode,
        format="text",
    )


#: the published_at before every message: where a pass of the orphan cleanup starts
PASS_START = datetime(1970, 1, 1, tzinfo=UTC)


#: Settings of the lease connections (see ``PostgresStore``): a lease needs no WAL-flush wait
#: (a lease lost in a crash only means another delivery: at-least-once), and its plan must not
#: depend on the queue tables' statistics, which are always stale (a table swings between a few
#: hundred live rows over thousands of dead ones and a million-message backlog within seconds).
#: Planned from stale statistics, the lease bitmap-scanned and sorted the whole backlog, joined
#: its rows back by a hash join over a sequential scan of the deliveries, and fetched payloads by
#: a merge join that read the messages' whole primary key (7,000+ buffers for 50 rows). With
#: these off it walks the dequeue index in order and every join is a nested loop of lookups.
#: That plan is the same whatever the parameters, so it is planned once per connection
#: (``force_generic_plan``): left to choose, PostgreSQL re-planned the lease on every call,
#: about a quarter of a 50-row lease's time (docs/adr/0014-queue-plans.md).
#: The planner settings that leave a queue table only its indexes and row ids. The lease
#: connections keep them; sweeps and nacks take them for one transaction (``_plan_by_keys``).
KEY_LOOKUPS = {
    "enable_bitmapscan": "off",
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}
LEASE_SETTINGS = {
    "synchronous_commit": "off",
    **KEY_LOOKUPS,
    "plan_cache_mode": "force_generic_plan",
}


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """Pool reset: nothing to undo. The store never changes session state (no SET, LISTEN,
    cursors or session advisory locks; migrations use their own connection), and asyncpg still
    rolls back a transaction left open before calling this. asyncpg's default reset is one more
    round trip to PostgreSQL for every transaction."""


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_no_session_state,
            server_settings={
                "timezone": "UTC",
                "synchronous_commit": "on",
                "application_name": "securebroker",
            }
            | (settings or {}),
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise Unavailable(f"cannot connect to PostgreSQL: {exc.__class__.__name__}") from exc
    assert pool is not None
    return pool


async def create_pools(
    dsn: str, *, min_size: int, max_size: int
) -> tuple[asyncpg.Pool, asyncpg.Pool]:
    """The main pool and a smaller lease pool (``LEASE_SETTINGS``)."""
    pool = await create_pool(dsn, min_size=min_size, max_size=max_size)
    try:
        lease_pool = await create_pool(
            dsn, min_size=1, max_size=max(2, max_size // 2), settings=LEASE_SETTINGS
        )
    except BaseException:
        await pool.close()
        raise
    return pool, lease_pool


@dataclass(frozen=True, slots=True)
class _SubRow:
    id: int
    name: str
    topic_id: int
    topic: str
    settings: SubscriptionSettings
    created_at: datetime


def _sub_row(r: asyncpg.Record) -> _SubRow:
    return _SubRow(
        id=r["id"],
        name=r["name"],
        topic_id=r["topic_id"],
        topic=r["topic"],
        settings=SubscriptionSettings(
            max_attempts=r["max_attempts"],
            lease=timedelta(milliseconds=r["lease_ms"]),
            backoff_base=timedelta(milliseconds=r["backoff_base_ms"]),
            backoff_max=timedelta(milliseconds=r["backoff_max_ms"]),
        ),
        created_at=r["created_at"],
    )


def _ms(d: timedelta) -> int:
    return int(d.total_seconds() * 1000)


#: claim rounds in one publish: a claim that conflicts and is gone when read back was an
#: expired claim the cleanup deleted in between; it is claimed again
CLAIM_ROUNDS = 3


async def _plan_by_keys(conn: Conn) -> None:
    """``KEY_LOOKUPS`` for the rest of ``conn``'s transaction only."""
    await conn.execute(Q["plan_by_keys"], list(KEY_LOOKUPS), list(KEY_LOOKUPS.values()))


def ordering_lock_key(topic_id: int, ordering_key: str) -> int:
    digest = hashlib.blake2b(f"{topic_id}\x00{ordering_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, lease_pool: asyncpg.Pool | None = None) -> None:
        """``pool`` serves everything durable; ``lease_pool`` (``LEASE_SETTINGS``) the dequeue."""
        self.pool = pool
        self.lease_pool = lease_pool
        #: the audit trail, written in the same transactions (set by the broker app; None in
        #: tests and tools that do not audit)
        self.audit: AuditLog | None = None
        self._topics: dict[str, tuple[int, float]] = {}
        self._subs: dict[str, tuple[_SubRow, float]] = {}
        #: where the next cleanup call looks for orphaned messages (published_at)
        self._cleanup_after = PASS_START

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 10) -> PostgresStore:
        pool, lease_pool = await create_pools(dsn, min_size=min_size, max_size=max_size)
        return cls(pool, lease_pool)

    @contextlib.asynccontextmanager
    async def _tx(
        self, pool: asyncpg.Pool | None = None
    ) -> AsyncIterator[tuple[Conn, list[AuditEvent] | None]]:
        """A transaction; with auditing on, the events appended to the yielded list are
        chained and written in it (``AuditLog.transaction``)."""
        audit = self.audit
        if audit is None:
            async with (pool or self.pool).acquire() as conn, conn.transaction():
                yield conn, None
        else:
            async with audit.transaction(pool or self.pool) as (conn, events):
                yield conn, events

    async def close(self) -> None:
        await self.pool.close()
        if self.lease_pool is not None:
            await self.lease_pool.close()

    # -- name resolution -----------------------------------------------------------------------
    async def _topic_id(self, conn: Conn, name: str) -> int:
        hit = self._topics.get(name)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        row = await conn.fetchrow(Q["topic_get"], name)
        if row is None:
            self._topics.pop(name, None)
            raise TopicNotFound(f"topic {name!r} does not exist")
        self._topics[name] = (row["id"], time.monotonic() + NAME_TTL)
        return int(row["id"])

    async def _sub(self, conn: Conn, name: str) -> _SubRow:
        hit = self._subs.get(name)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        row = await conn.fetchrow(Q["sub_get"], name)
        if row is None:
            self._subs.pop(name, None)
            raise SubscriptionNotFound(f"subscription {name!r} does not exist")
        sub = _sub_row(row)
        self._subs[name] = (sub, time.monotonic() + NAME_TTL)
        return sub

    async def _sub_or_error(self, conn: Conn, name: str) -> _SubRow | BrokerError:
        try:
            return await self._sub(conn, name)
        except SubscriptionNotFound as exc:
            return exc

    # -- topics and subscriptions ------------------------------------------------------------
    async def create_topic(
        self, name: str, now: datetime, *, actor: Actor | None = None
    ) -> TopicInfo:
        async with self._tx() as (conn, events):
            row = await conn.fetchrow(Q["topic_create"], name, now)
            if row is None:
                raise AlreadyExists(f"topic {name!r} already exists")
            if events is not None:
                events.append(ae.admin(now, actor, "topic.create", topic=name))
        return TopicInfo(row["name"], row["created_at"])

    async def get_topic(self, name: str) -> TopicInfo:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(Q["topic_get"], name)
        if row is None:
            raise TopicNotFound(f"topic {name!r} does not exist")
        return TopicInfo(row["name"], row["created_at"], tuple(row["subs"]))

    async def list_topics(self) -> list[TopicInfo]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(Q["topic_list"])
        return [TopicInfo(r["name"], r["created_at"], tuple(r["subs"])) for r in rows]

    async def delete_topic(
        self, name: str, *, force: bool, now: datetime, actor: Actor | None = None
    ) -> None:
        async with self._tx() as (conn, events):
            row = await conn.fetchrow(Q["topic_get"], name)
            if row is None:
                raise TopicNotFound(f"topic {name!r} does not exist")
            if row["subs"] and not force:
                raise NotEmpty(f"topic {name!r} has subscriptions; delete them or use force")
            for sub in row["subs"]:
                srow = await conn.fetchrow(Q["sub_get"], sub)
                assert srow is not None
                await conn.execute(Q["sub_delete_deliveries"], srow["id"])
                await conn.execute(Q["sub_delete"], srow["id"])
                self._subs.pop(sub, None)
            await conn.execute(Q["topic_delete_messages"], row["id"])
            await conn.execute(Q["topic_delete_idempotency"], row["id"])
            await conn.execute(Q["topic_delete"], row["id"])
            if events is not None:
                detail: dict[str, str | int | bool | None] = {
                    "force": force,
                    "subscriptions": ",".join(row["subs"]),
                }
                events.append(ae.admin(now, actor, "topic.delete", topic=name, detail=detail))
        self._topics.pop(name, None)

    async def create_subscription(
        self,
        name: str,
        topic: str,
        settings: SubscriptionSettings,
        now: datetime,
        *,
        actor: Actor | None = None,
    ) -> SubscriptionInfo:
        async with self._tx() as (conn, events):
            trow = await conn.fetchrow(Q["topic_get"], topic)
            if trow is None:
                raise TopicNotFound(f"topic {topic!r} does not exist")
            sid = await conn.fetchval(
                Q["sub_create"],
                name,
                trow["id"],
                settings.max_attempts,
                _ms(settings.lease),
                _ms(settings.backoff_base),
                _ms(settings.backoff_max),
                now,
            )
            if sid is None:
                raise AlreadyExists(f"subscription {name!r} already exists")
            if events is not None:
                events.append(
                    ae.admin(now, actor, "subscription.create", topic=topic, subscription=name)
                )
        return SubscriptionInfo(name, topic, settings, now, SubscriptionCounts())

    async def get_subscription(self, name: str, now: datetime) -> SubscriptionInfo:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(Q["sub_get"], name)
            if row is None:
                raise SubscriptionNotFound(f"subscription {name!r} does not exist")
            c = await conn.fetchrow(Q["sub_counts"], row["id"], now)
        assert c is not None
        s = _sub_row(row)
        counts = SubscriptionCounts(c["ready"], c["delayed"], c["leased"], c["dead"])
        return SubscriptionInfo(s.name, s.topic, s.settings, s.created_at, counts)

    async def list_subscriptions(self, topic: str | None) -> list[SubscriptionInfo]:
        async with self.pool.acquire() as conn:
            if topic is not None and await conn.fetchrow(Q["topic_get"], topic) is None:
                raise TopicNotFound(f"topic {topic!r} does not exist")
            rows = await conn.fetch(Q["sub_list"], topic)
        subs = [_sub_row(r) for r in rows]
        return [SubscriptionInfo(s.name, s.topic, s.settings, s.created_at) for s in subs]

    async def delete_subscription(
        self, name: str, *, force: bool, now: datetime, actor: Actor | None = None
    ) -> None:
        async with self._tx() as (conn, events):
            row = await conn.fetchrow(Q["sub_get"], name)
            if row is None:
                raise SubscriptionNotFound(f"subscription {name!r} does not exist")
            held = await conn.fetchval(Q["sub_has_deliveries"], row["id"])
            if held and not force:
                raise NotEmpty(f"subscription {name!r} still holds {held} messages; use force")
            await conn.execute(Q["sub_delete_deliveries"], row["id"])
            await conn.execute(Q["sub_delete"], row["id"])
            if events is not None:
                events.append(
                    ae.admin(
                        now,
                        actor,
                        "subscription.delete",
                        topic=row["topic"],
                        subscription=name,
                        detail={"force": force, "messages_dropped": int(held or 0)},
                    )
                )
        self._subs.pop(name, None)

    # -- publish -------------------------------------------------------------------------------
    async def publish(
        self, messages: Sequence[PreparedMessage], retention: timedelta
    ) -> list[PublishResult]:
        try:
            async with self._tx() as (conn, events):
                return await self.publish_in(conn, messages, retention, events)
        except BrokerError as exc:
            self.audit_rejected(messages, exc)
            raise

    def audit_rejected(self, messages: Sequence[PreparedMessage], exc: BrokerError) -> None:
        """Record refused publishes (idempotency conflict, unknown topic): nothing changed, so
        they are written on their own, after the rollback."""
        if self.audit is None:
            return
        self.audit.record(
            ae.message_event(
                Event.REJECTED,
                m.published_at,
                m.actor,
                m.topic,
                m.id,
                trace_context=m.trace_context,
                outcome=Outcome.FAILURE,
                detail={"reason": exc.code},
            )
            for m in messages
        )

    async def publish_in(
        self,
        conn: Conn,
        messages: Sequence[PreparedMessage],
        retention: timedelta,
        events: list[AuditEvent] | None = None,
    ) -> list[PublishResult]:
        """Publish inside the caller's transaction (used by group commit and atomic settle)."""
        topic_ids = [await self._topic_id(conn, m.topic) for m in messages]
        results: list[PublishResult | None] = [None] * len(messages)
        fresh = [m.idempotency_key is None for m in messages]

        keyed: dict[tuple[int, str, str], int] = {}
        alias: dict[int, int] = {}  # in-batch repeat of a key -> index of its first use
        for i, m in enumerate(messages):
            if m.idempotency_key is None:
                continue
            k = (topic_ids[i], m.producer_scope, m.idempotency_key)
            first = keyed.setdefault(k, i)
            if first != i:
                if messages[first].fingerprint != m.fingerprint:
                    raise _conflict(m)
                alias[i] = first
        todo = sorted(keyed)
        for _ in range(CLAIM_ROUNDS):
            if not todo:
                break
            claimed = await conn.fetch(
                Q["idem_claim"],
                [k[0] for k in todo],
                [k[1] for k in todo],
                [k[2] for k in todo],
                [messages[keyed[k]].id for k in todo],
                [messages[keyed[k]].fingerprint for k in todo],
                [messages[keyed[k]].published_at for k in todo],
            )
            won = {r["message_id"] for r in claimed}
            lost = [k for k in todo if messages[keyed[k]].id not in won]
            for k in todo:
                fresh[keyed[k]] = messages[keyed[k]].id in won
            todo = []
            if lost:
                prior = await conn.fetch(
                    Q["idem_existing"],
                    [k[0] for k in lost],
                    [k[1] for k in lost],
                    [k[2] for k in lost],
                )
                # A claim that conflicted but is gone now was an expired one the cleanup
                # deleted in between (a committed delete this statement sees): claim again.
                found = {(r["topic_id"], r["producer_scope"], r["key"]) for r in prior}
                todo = [k for k in lost if k not in found]
                for row in prior:
                    i = keyed[(row["topic_id"], row["producer_scope"], row["key"])]
                    m = messages[i]
                    if row["created_at"] <= m.published_at - retention:
                        await conn.execute(
                            Q["idem_renew"],
                            row["topic_id"],
                            row["producer_scope"],
                            row["key"],
                            m.id,
                            m.fingerprint,
                            m.published_at,
                        )
                        fresh[i] = True
                    elif row["fingerprint"] != m.fingerprint:
                        raise _conflict(m)
                    else:
                        results[i] = PublishResult(row["message_id"], duplicate=True)
        if todo:  # the cleanup kept deleting what we found: let the client retry
            raise Unavailable("idempotency claims changed under this publish; retry it")

        new = [(i, m) for i, m in enumerate(messages) if fresh[i] and i not in alias]
        if new:
            locks = sorted(
                {
                    ordering_lock_key(topic_ids[i], m.ordering_key)
                    for i, m in new
                    if m.ordering_key is not None
                }
            )
            if locks:
                await conn.fetchval(Q["ordering_lock"], locks)
            await conn.execute(
                Q["publish"],
                *_insert_args([m for _, m in new], [topic_ids[i] for i, _ in new]),
            )
            for i, m in new:
                results[i] = PublishResult(m.id)
        for j, i in alias.items():
            origin = results[i]
            assert origin is not None
            results[j] = PublishResult(origin.message_id, duplicate=True)
        out: list[PublishResult] = []
        for r in results:
            assert r is not None
            out.append(r)
        if events is not None:
            # as the one-statement path records them: the published in batches, then each
            # duplicate on its own (it may name a message published just above)
            events += _published(
                _by_connection(m for m, r in zip(messages, out, strict=True) if not r.duplicate)
            )
            events += [
                ae.message_event(
                    Event.DEDUPLICATED,
                    m.published_at,
                    m.actor,
                    m.topic,
                    r.message_id,
                    trace_context=m.trace_context,
                )
                for m, r in zip(messages, out, strict=True)
                if r.duplicate
            ]
        return out

    async def publish_group(
        self, messages: Sequence[PreparedMessage]
    ) -> list[PublishResult] | None:
        """Publish fresh messages, with their audit records, in ONE statement (its own
        transaction; migration 0005). ``None`` when the group is not for this path (a key
        repeated in the group, or already claimed: nothing was kept) and must go the general
        way (``publish_in``). Same rows, same audit records, one round trip instead of five."""
        if not messages:
            return []
        results = [PublishResult(m.id) for m in messages]
        # one "published" record per connection and topic: the statement takes the messages
        # of each record together, in their order (so each connection's order is kept)
        batches = [list(messages)] if self.audit is None else _by_connection(messages)
        if len(batches) > 1:
            messages = [m for b in batches for m in b]
        async with self._group_conn() as (conn, tx):
            topic_ids = [await self._topic_id(conn, m.topic) for m in messages]
            keys: set[tuple[int, str, str]] = set()
            locks: set[int] = set()
            for tid, m in zip(topic_ids, messages, strict=True):
                if m.idempotency_key is not None:
                    k = (tid, m.producer_scope, m.idempotency_key)
                    if k in keys:
                        return None
                    keys.add(k)
                if m.ordering_key is not None:
                    locks.add(ordering_lock_key(tid, m.ordering_key))
            args: list[Any] = [
                *_insert_args(messages, topic_ids),
                [m.producer_scope for m in messages],
                [m.fingerprint for m in messages],
                sorted(locks) if locks else None,
            ]
            events = [] if self.audit is None else _published(batches)
            if not await self._one_statement(conn, tx, Q["publish_group"], args, events, CLAIMED):
                return None
        return results

    @contextlib.asynccontextmanager
    async def _group_conn(self) -> AsyncIterator[tuple[Conn, _GroupTx]]:
        """A connection for a one-statement group, and (with auditing) a lane checked out
        FIRST, as ``AuditLog.transaction`` does: creating a lane may need a connection of its
        own, which must never be awaited while this one is held."""
        audit = self.audit
        tx = _GroupTx(None if audit is None else await audit.checkout())
        try:
            async with self.pool.acquire() as conn:
                if audit is not None:
                    await audit.check_server(conn)
                yield conn, tx
        finally:
            if audit is not None and tx.lane is not None:
                audit.checkin(tx.lane, tx.staged, tx.outcome)

    async def _one_statement(
        self,
        conn: Conn,
        tx: _GroupTx,
        query: str,
        args: Sequence[Any],
        events: Sequence[AuditEvent],
        refused: str,
    ) -> bool:
        """Run a group's statement (its own transaction) with the audit records of ``events``
        chained on the group's lane; False when the server refused it with SQLSTATE
        ``refused``, in which case nothing was kept."""
        audit = self.audit
        if audit is None or tx.lane is None:
            try:
                await conn.fetchval(query, *args, *_NO_AUDIT)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate == refused:
                    return False
                raise
            return True
        tx.staged = tx.lane.stage(events)
        tx.outcome = "unknown"  # once sent, the statement may have committed
        try:
            await conn.fetchval(query, *args, *_audit_args(tx.staged))
            tx.outcome = "committed"
        except CONNECTION_ERRORS:
            audit.connection_lost()
            raise
        except asyncpg.PostgresError as exc:
            tx.outcome = "rolled_back"  # the server refused the statement: nothing was kept
            if exc.sqlstate == refused:
                return False
            raise
        return True

    # -- consume -------------------------------------------------------------------------------
    async def lease(
        self,
        subscription: str,
        max_count: int,
        lease_for: timedelta | None,
        consumer: str,
        now: datetime,
        *,
        actor: Actor | None = None,
    ) -> list[Delivery]:
        """Lease up to ``max_count`` deliveries. A lost database connection (a restart, a
        failover) is ``Unavailable``: retryable, so consumers keep polling until it is back. (A
        lease is safe to retry: one whose commit was lost only expires.)"""
        try:
            return await self._lease(subscription, max_count, lease_for, consumer, now, actor)
        except DB_ERRORS as exc:
            raise Unavailable(f"database error: {exc.__class__.__name__}") from exc

    async def _lease(
        self,
        subscription: str,
        max_count: int,
        lease_for: timedelta | None,
        consumer: str,
        now: datetime,
        actor: Actor | None,
    ) -> list[Delivery]:
        pool = self.lease_pool or self.pool
        args = (subscription, max_count, lease_for, consumer, now)
        if self.audit is None:  # one statement, no explicit transaction
            async with pool.acquire() as conn:
                until, rows = await self._lease_rows(conn, *args)
        else:  # the lease and its "delivered" records commit together
            async with self._tx(pool) as (conn, events):
                until, rows = await self._lease_rows(conn, *args)
                assert events is not None
                _delivered(events, rows, now, actor, subscription)
        return [
            Delivery(
                subscription=subscription,
                topic=r["topic"],
                message_id=r["message_id"],
                lease_token=r["lease_token"],
                lease_expires_at=until,
                attempt=r["attempts"],
                payload=r["payload"],
                attributes=r["attributes"],
                content_type=r["content_type"],
                idempotency_key=r["idempotency_key"],
                ordering_key=r["ordering_key"],
                published_at=r["published_at"],
                producer=r["producer"],
                trace_context=r["trace_context"],
            )
            for r in rows
        ]

    async def _lease_rows(
        self,
        conn: Conn,
        subscription: str,
        max_count: int,
        lease_for: timedelta | None,
        consumer: str,
        now: datetime,
    ) -> tuple[datetime, list[asyncpg.Record]]:
        sub = await self._sub(conn, subscription)
        until = now + (lease_for or sub.settings.lease)
        rows = await conn.fetch(
            Q["lease"], sub.id, now, sub.settings.max_attempts, max_count, until, consumer
        )
        return until, rows

    async def _resolve_refs(
        self, conn: Conn, refs: Sequence[SettleRef | NackRef]
    ) -> tuple[list[BrokerError | None], list[tuple[int, _SubRow]]]:
        results: list[BrokerError | None] = [None] * len(refs)
        todo: list[tuple[int, _SubRow]] = []
        seen: set[tuple[uuid.UUID, str]] = set()
        for i, ref in enumerate(refs):
            sub = await self._sub_or_error(conn, ref.subscription)
            if isinstance(sub, BrokerError):
                results[i] = sub
            elif (ref.message_id, ref.subscription) in seen:
                results[i] = StaleLease(STALE)
            else:
                seen.add((ref.message_id, ref.subscription))
                todo.append((i, sub))
        return results, todo

    async def ack(self, refs: Sequence[SettleRef], now: datetime) -> list[BrokerError | None]:
        async with self._tx() as (conn, events):
            return await self.ack_in(conn, refs, now, events)

    async def ack_group(
        self, refs: Sequence[SettleRef], now: datetime
    ) -> list[BrokerError | None] | None:
        """Acks, with their audit records, in ONE statement (migration 0005); ``None`` when the
        group is not for this path (an unknown subscription, a repeated or stale ack: nothing
        was kept) and must go the general way (``ack_in``)."""
        if not refs:
            return []
        async with self._group_conn() as (conn, tx):
            results, todo = await self._resolve_refs(conn, refs)
            if len(todo) != len(refs):
                return None
            # the statement takes the acks of each record together
            batches = _by_consumer((refs[i], sub) for i, sub in todo)
            events = [] if self.audit is None else _acked(batches, now)
            pairs = [x for b in batches for x in b]
            args = (
                [ref.message_id for ref, _ in pairs],
                [sub.id for _, sub in pairs],
                [ref.lease_token for ref, _ in pairs],
            )
            if not await self._one_statement(
                conn, tx, Q["ack_group"], args, events, STALE_IN_GROUP
            ):
                return None
        return results

    async def ack_in(
        self,
        conn: Conn,
        refs: Sequence[SettleRef],
        now: datetime,
        events: list[AuditEvent] | None = None,
    ) -> list[BrokerError | None]:
        results, todo = await self._resolve_refs(conn, refs)
        if todo:
            done = await conn.fetch(
                Q["ack"],
                [refs[i].message_id for i, _ in todo],
                [s.id for _, s in todo],
                [refs[i].lease_token for i, _ in todo],
            )
            ok = {(r["message_id"], r["subscription_id"]) for r in done}
            acked: list[tuple[SettleRef, _SubRow]] = []
            for i, s in todo:
                if (refs[i].message_id, s.id) in ok:
                    acked.append((refs[i], s))
                else:
                    results[i] = StaleLease(STALE)
            if events is not None:
                events += _acked(_by_consumer(acked), now)
        return results

    async def nack(
        self, refs: Sequence[NackRef], now: datetime, policy: RetryPolicy
    ) -> list[BrokerError | None]:
        async with self._tx() as (conn, events):
            return await self.nack_in(conn, refs, now, policy, events)

    async def nack_in(
        self,
        conn: Conn,
        refs: Sequence[NackRef],
        now: datetime,
        policy: RetryPolicy,
        events: list[AuditEvent] | None = None,
    ) -> list[BrokerError | None]:
        """Nack in ``conn``'s transaction. nack_apply joins its per-row values to the rows
        nack_lock locked, by row id: ``_plan_by_keys`` first, or on a drained table's one-row
        estimate that join scanned the whole table once per nack (12 s for 1,000 nacks with
        100,000 queued)."""
        results, todo = await self._resolve_refs(conn, refs)
        if not todo:
            return results
        await _plan_by_keys(conn)
        locked = await conn.fetch(
            Q["nack_lock"],
            [refs[i].message_id for i, _ in todo],
            [s.id for _, s in todo],
            [refs[i].lease_token for i, _ in todo],
        )
        held = {(r["message_id"], r["subscription_id"]): r for r in locked}
        cols: tuple[list[Any], ...] = ([], [], [], [], [])
        for i, sub in todo:
            ref = refs[i]
            row = held.get((ref.message_id, sub.id))
            if row is None:
                results[i] = StaleLease(STALE)
                continue
            n = row["attempts"]
            if n >= sub.settings.max_attempts:
                state, at, reason = DeliveryState.DEAD, now, DeadReason.MAX_ATTEMPTS.value
            else:
                delay = ref.delay if ref.delay is not None else policy.delay(n, sub.settings)
                state, at, reason = DeliveryState.READY, now + delay, None
            for col, v in zip(
                cols, (row["row_id"], int(state), at, ref.error, reason), strict=True
            ):
                col.append(v)
            if events is not None:
                _nacked(events, ref, sub.topic, n, state, at, now)
        if cols[0]:
            await conn.execute(Q["nack_apply"], *cols, now)
        return results

    async def settle(
        self,
        acks: Sequence[SettleRef],
        messages: Sequence[PreparedMessage],
        *,
        scope: str,
        settle_id: str,
        fingerprint: bytes,
        retention: timedelta,
        now: datetime,
    ) -> SettleOutcome:
        try:
            async with self._tx() as (conn, events):
                if (
                    await conn.fetchval(Q["settle_claim"], scope, settle_id, now, fingerprint)
                    is None
                ):
                    # taken: by a committed settle (its results), or by one past retention
                    prior = await conn.fetchrow(Q["settle_get"], scope, settle_id)
                    assert prior is not None
                    if prior["created_at"] > now - retention and prior["results"] is not None:
                        if bytes(prior["fingerprint"]) != fingerprint:
                            raise _settle_conflict(settle_id)
                        return SettleOutcome(_settle_results(prior["results"]), duplicate=True)
                    await conn.execute(Q["settle_renew"], scope, settle_id, now, fingerprint)
                acked = await self.ack_in(conn, acks, now, events)
                for ref, err in zip(acks, acked, strict=True):
                    if err is not None:
                        raise type(err)(
                            f"settle {settle_id!r}: {err.message} (message {ref.message_id} on "
                            f"{ref.subscription}); nothing was acked or published"
                        )
                published = (
                    await self.publish_in(conn, messages, retention, events) if messages else []
                )
                await conn.execute(
                    Q["settle_done"],
                    scope,
                    settle_id,
                    [[str(r.message_id), r.duplicate] for r in published],
                )
            return SettleOutcome(published)
        except BrokerError as exc:
            if messages:
                self.audit_rejected(messages, exc)
            raise
        except DB_ERRORS as exc:
            # the outcome may be unknown: retrying with the same settle id is safe
            raise Unavailable(f"database error: {exc.__class__.__name__}") from exc

    async def extend(self, ref: SettleRef, lease_for: timedelta, now: datetime) -> datetime:
        async with self.pool.acquire() as conn:
            sub = await self._sub(conn, ref.subscription)
            until: datetime | None = await conn.fetchval(
                Q["extend"], ref.message_id, sub.id, ref.lease_token, now + lease_for
            )
        if until is None:
            raise StaleLease(STALE)
        return until

    # -- maintenance ---------------------------------------------------------------------------
    async def sweep(self, now: datetime, limit: int) -> SweepResult:
        async with self._tx() as (conn, events):
            await _plan_by_keys(conn)
            expired = await conn.fetch(Q["sweep_expired"], now, limit)
            exhausted = await conn.fetch(Q["sweep_exhausted"], now, limit)
            if events is not None:
                _swept(events, expired, exhausted, now)
        return SweepResult(len(expired), len(exhausted))

    async def cleanup(
        self, now: datetime, idempotency_retention: timedelta, grace: timedelta, limit: int
    ) -> CleanupResult:
        async with self.pool.acquire() as conn:
            # orphaned messages: a bounded slice of the table per call, in passes (a slice
            # shorter than the limit ended a pass: the next call starts over)
            msgs = await conn.fetchrow(
                Q["cleanup_messages"], now - grace, limit, self._cleanup_after
            )
            assert msgs is not None  # one row of counts, always
            self._cleanup_after = msgs["last_at"] if msgs["examined"] >= limit else PASS_START
            keys = await conn.execute(Q["cleanup_idempotency"], now - idempotency_retention, limit)
            await conn.execute(Q["cleanup_settles"], now - idempotency_retention, limit)
        return CleanupResult(msgs["deleted"], _count(keys))

    # -- dead letters and purge ----------------------------------------------------------------
    async def list_dead(
        self, subscription: str, limit: int, after: uuid.UUID | None
    ) -> list[DeadLetter]:
        async with self.pool.acquire() as conn:
            sub = await self._sub(conn, subscription)
            rows = await conn.fetch(Q["dead_list"], sub.id, after, limit)
        return [
            DeadLetter(
                subscription=subscription,
                topic=r["topic"],
                message_id=r["message_id"],
                idempotency_key=r["idempotency_key"],
                attempts=r["attempts"],
                reason=r["dead_reason"],
                last_error=r["last_error"],
                dead_at=r["dead_at"],
                published_at=r["published_at"],
                history=tuple(r["history"]),
            )
            for r in rows
        ]

    async def redrive(
        self,
        subscription: str,
        message_ids: Sequence[uuid.UUID] | None,
        now: datetime,
        *,
        actor: Actor | None = None,
    ) -> int:
        async with self._tx() as (conn, events):
            sub = await self._sub(conn, subscription)
            ids = None if message_ids is None else list(message_ids)
            rows = await conn.fetch(Q["redrive"], sub.id, ids, now)
            if events is not None:
                _per_message(events, Event.REDRIVEN, rows, now, actor, sub, "dlq.redrive")
        return len(rows)

    async def purge(
        self,
        subscription: str,
        *,
        dead: bool,
        now: datetime,
        actor: Actor | None = None,
    ) -> int:
        async with self._tx() as (conn, events):
            sub = await self._sub(conn, subscription)
            rows = await conn.fetch(Q["purge"], sub.id, dead)
            if rows:
                await conn.execute(Q["orphans_delete"], [r["message_id"] for r in rows])
            if events is not None:
                op = "dlq.purge" if dead else "subscription.purge"
                _per_message(events, Event.PURGED, rows, now, actor, sub, op)
        return len(rows)


def _settle_conflict(settle_id: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"settle id {settle_id!r} was used for a different settle; nothing was acked or published"
    )


def _settle_results(stored: Any) -> list[PublishResult]:
    return [PublishResult(uuid.UUID(mid), bool(dup)) for mid, dup in stored]


def _delivered(
    events: list[AuditEvent],
    rows: Sequence[asyncpg.Record],
    now: datetime,
    actor: Actor | None,
    subscription: str,
) -> None:
    """A lease: "lease_expired" for each message that was still leased to a consumer whose
    lease ran out, then "delivered": one record per topic and attempt number, listing the
    messages (ADR 0013)."""
    for r in rows:
        if r["prev_state"] == DeliveryState.LEASED:
            events.append(
                _lease_expired(
                    now, r["topic"], r["message_id"], subscription, r["attempts"] - 1,
                    r["prev_consumer"],
                )
            )  # fmt: skip
    for b in _batches(rows, lambda r: (r["topic"], r["attempts"])):
        events.append(
            ae.batch(
                Event.DELIVERED,
                now,
                actor,
                b[0]["topic"],
                [r["message_id"] for r in b],
                ae.trace_ids(r["trace_context"] for r in b),
                subscription=subscription,
                detail={"attempt": b[0]["attempts"]},
            )
        )


def _lease_expired(
    now: datetime,
    topic: str,
    message_id: uuid.UUID,
    subscription: str,
    attempt: int,
    consumer: str | None,
) -> AuditEvent:
    return ae.message_event(
        Event.LEASE_EXPIRED,
        now,
        BROKER,
        topic,
        message_id,
        subscription=subscription,
        detail={"attempt": attempt, "consumer": consumer},
    )


def _nacked(
    events: list[AuditEvent],
    ref: NackRef,
    topic: str,
    attempt: int,
    state: DeliveryState,
    available_at: datetime,
    now: datetime,
) -> None:
    # The consumer's error text is not recorded: it may quote the payload.
    detail: dict[str, str | int | bool | None] = {"attempt": attempt}
    if state == DeliveryState.READY:
        detail["redeliver_after_ms"] = int((available_at - now).total_seconds() * 1000)
    events.append(
        ae.message_event(
            Event.NACKED,
            now,
            ref.actor,
            topic,
            ref.message_id,
            subscription=ref.subscription,
            detail=detail,
        )
    )
    if state == DeliveryState.DEAD:
        events.append(
            ae.message_event(
                Event.DEAD_LETTERED,
                now,
                BROKER,
                topic,
                ref.message_id,
                subscription=ref.subscription,
                detail={"reason": DeadReason.MAX_ATTEMPTS.value, "attempts": attempt},
            )
        )


def _swept(
    events: list[AuditEvent],
    expired: Sequence[asyncpg.Record],
    exhausted: Sequence[asyncpg.Record],
    now: datetime,
) -> None:
    for r in expired:
        events.append(
            ae.message_event(
                Event.EXPIRED, now, BROKER, r["topic"], r["message_id"], subscription=r["sub"]
            )
        )
    for r in exhausted:
        events.append(
            _lease_expired(now, r["topic"], r["message_id"], r["sub"], r["attempts"], r["consumer"])
        )
        events.append(
            ae.message_event(
                Event.DEAD_LETTERED,
                now,
                BROKER,
                r["topic"],
                r["message_id"],
                subscription=r["sub"],
                detail={"reason": DeadReason.MAX_ATTEMPTS.value, "attempts": r["attempts"]},
            )
        )


def _per_message(
    events: list[AuditEvent],
    event: Event,
    rows: Sequence[asyncpg.Record],
    now: datetime,
    actor: Actor | None,
    sub: _SubRow,
    operation: str,
) -> None:
    """An admin action on many messages: one admin record, then one record per message so
    each message's trail shows it."""
    events.append(
        ae.admin(
            now,
            actor,
            operation,
            topic=sub.topic,
            subscription=sub.name,
            detail={"messages": len(rows)},
        )
    )
    for r in rows:
        events.append(
            ae.message_event(
                event,
                now,
                actor,
                sub.topic,
                r["message_id"],
                subscription=sub.name,
                detail={"operation": operation},
            )
        )


def _conflict(m: PreparedMessage) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"idempotency key {m.idempotency_key!r} was used for a different message"
    )


def _count(status: str) -> int:
    """Rows affected, from a command tag such as ``DELETE 42``."""
    return int(status.rsplit(" ", 1)[-1])


#: ``sb_publish_group`` raises this when an idempotency key of the group is already claimed
CLAIMED = "SB001"
#: ``sb_ack_group`` raises this when an ack of the group no longer holds its lease
STALE_IN_GROUP = "SB002"
#: the audit arguments of ``sb_publish_group`` and ``sb_ack_group`` with auditing off
_NO_AUDIT: tuple[None, ...] = (None,) * 14


def _audit_args(staged: Sequence[Row]) -> tuple[Any, ...]:
    """``sb_publish_group``/``sb_ack_group``'s audit arguments from a lane's staged batch
    records (``COLUMNS`` order): chain, the sequence number before the first, the lane's head,
    the trace ids of all the records' messages (in record order, which is the order of the
    statement's messages); per record its time, context (an index, 1-based, into the group's
    distinct contexts: actor, topic and subscription, exactly as hashed), message count and
    hash; then the contexts."""
    contexts: dict[tuple[Any, ...], int] = {}
    at: list[datetime] = []
    ctx: list[int] = []
    count: list[int] = []
    trace: list[str | None] = []
    hashes: list[bytes] = []
    for r in staged:
        key = (r[5], r[6], r[7], r[8], r[9], r[10])
        i = contexts.get(key)
        if i is None:
            i = contexts[key] = len(contexts) + 1
        at.append(r[2])
        ctx.append(i)
        count.append(len(r[17]))
        trace.extend(r[18])
        hashes.append(r[16])
    first = staged[0]
    return (
        first[0],
        first[1] - 1,
        first[15],
        _column(trace),
        at,
        ctx,
        count,
        hashes,
        *([c[j] for c in contexts] for j in range(6)),
    )


def _published(batches: Iterable[Sequence[PreparedMessage]]) -> list[AuditEvent]:
    """One "published" record per batch of ``_by_connection`` (ADR 0013), at the time of its
    latest message."""
    return [
        ae.batch(
            Event.PUBLISHED,
            max(m.published_at for m in b),
            b[0].actor,
            b[0].topic,
            [m.id for m in b],
            ae.trace_ids(m.trace_context for m in b),
        )
        for b in batches
    ]


def _acked(
    batches: Iterable[Sequence[tuple[SettleRef, _SubRow]]], now: datetime
) -> list[AuditEvent]:
    """One "acked" record per batch of ``_by_consumer`` (ADR 0013)."""
    return [
        ae.batch(
            Event.ACKED,
            now,
            b[0][0].actor,
            b[0][1].topic,
            [ref.message_id for ref, _ in b],
            [None] * len(b),
            subscription=b[0][1].name,
        )
        for b in batches
    ]


def _by_connection(messages: Iterable[PreparedMessage]) -> list[list[PreparedMessage]]:
    """Messages grouped by actor (one per connection) and topic: one audit record each."""
    return _batches(messages, lambda m: (id(m.actor), m.topic))


def _by_consumer(
    pairs: Iterable[tuple[SettleRef, _SubRow]],
) -> list[list[tuple[SettleRef, _SubRow]]]:
    """Settles grouped by actor (one per connection) and subscription: one record each."""
    return _batches(pairs, lambda x: (id(x[0].actor), x[1].id))


def _insert_args(messages: Sequence[PreparedMessage], topic_ids: Sequence[int]) -> list[Any]:
    """The arguments of ``sb_insert_messages`` (migration 0005), which both publish paths call:
    the general path's named query "publish" and ``sb_publish_group``'s first twelve."""
    return [
        [m.id for m in messages],
        topic_ids,
        [m.payload for m in messages],
        _column([m.attributes or None for m in messages]),
        [m.content_type for m in messages],
        _column([m.idempotency_key for m in messages]),
        _column([m.ordering_key for m in messages]),
        [m.producer for m in messages],
        _column([m.not_before for m in messages]),
        _column([m.expires_at for m in messages]),
        _column([m.trace_context or None for m in messages]),
        [m.published_at for m in messages],
    ]


def _column(values: list[T]) -> list[T] | None:
    """A per-message array argument of a group statement, or None when every value is None:
    asyncpg checks each element of an array for nesting (an ``isinstance`` against three ABCs:
    a few percent of the broker's CPU), and ``unnest`` pads a NULL array with NULLs, so the
    rows are the same."""
    for v in values:
        if v is not None:
            return values
    return None


def _batches(items: Iterable[T], key: Callable[[T], Hashable]) -> list[list[T]]:
    """``items`` grouped by ``key``, groups in order of first appearance, items in order."""
    groups: dict[Hashable, list[T]] = {}
    for it in items:
        k = key(it)
        g = groups.get(k)
        if g is None:
            groups[k] = [it]
        else:
            g.append(it)
    return list(groups.values())


@dataclass
class _GroupTx:
    """A one-statement group's lane and how its statement ended (for ``AuditLog.checkin``)."""

    lane: Lane | None
    staged: list[Row] = field(default_factory=list)
    outcome: TxOutcome = "rolled_back"
