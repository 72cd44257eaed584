"""An in-memory store behind the same port as PostgreSQL, for unit tests of the core.

Every method runs without awaiting in the middle, so on one event loop each call is atomic,
just as each PostgreSQL call is one transaction. It is not durable and not for production.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from securebroker.audit.record import Actor
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
)

STALE = "lease token does not own this delivery (lease expired and moved on, or already settled)"


@dataclass
class _Row:
    message_id: uuid.UUID
    subscription: str
    seq: int
    available_at: datetime
    ordering_key: str | None
    expires_at: datetime | None
    state: DeliveryState = DeliveryState.READY
    attempts: int = 0
    lease_token: uuid.UUID | None = None
    lease_expires_at: datetime | None = None
    consumer: str = ""
    last_error: str | None = None
    dead_reason: str | None = None
    dead_at: datetime | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Sub:
    name: str
    topic: str
    settings: SubscriptionSettings
    created_at: datetime


class MemoryStore:
    def __init__(self) -> None:
        self.topics: dict[str, datetime] = {}
        self.subs: dict[str, _Sub] = {}
        self.messages: dict[uuid.UUID, tuple[int, PreparedMessage]] = {}
        self.rows: dict[tuple[uuid.UUID, str], _Row] = {}
        self.idem: dict[tuple[str, str, str], tuple[uuid.UUID, bytes, datetime]] = {}
        self.settles: dict[tuple[str, str], tuple[list[PublishResult], datetime, bytes]] = {}
        self._seq = itertools.count(1)

    # -- topics and subscriptions ------------------------------------------------------------
    # The memory store keeps no audit trail: ``actor`` is accepted for the port and ignored.
    async def create_topic(
        self, name: str, now: datetime, *, actor: Actor | None = None
    ) -> TopicInfo:
        if name in self.topics:
            raise AlreadyExists(f"topic {name!r} already exists")
        self.topics[name] = now
        return TopicInfo(name, now)

    async def get_topic(self, name: str) -> TopicInfo:
        if name not in self.topics:
            raise TopicNotFound(f"topic {name!r} does not exist")
        subs = tuple(sorted(s.name for s in self.subs.values() if s.topic == name))
        return TopicInfo(name, self.topics[name], subs)

    async def list_topics(self) -> list[TopicInfo]:
        return [await self.get_topic(n) for n in sorted(self.topics)]

    async def delete_topic(
        self, name: str, *, force: bool, now: datetime, actor: Actor | None = None
    ) -> None:
        info = await self.get_topic(name)
        if info.subscriptions and not force:
            raise NotEmpty(f"topic {name!r} has subscriptions; delete them or use force")
        for s in info.subscriptions:
            await self.delete_subscription(s, force=True, now=now)
        for mid in [m for m, (_, pm) in self.messages.items() if pm.topic == name]:
            del self.messages[mid]
        for k in [k for k in self.idem if k[0] == name]:
            del self.idem[k]
        del self.topics[name]

    async def create_subscription(
        self,
        name: str,
        topic: str,
        settings: SubscriptionSettings,
        now: datetime,
        *,
        actor: Actor | None = None,
    ) -> SubscriptionInfo:
        if topic not in self.topics:
            raise TopicNotFound(f"topic {topic!r} does not exist")
        if name in self.subs:
            raise AlreadyExists(f"subscription {name!r} already exists")
        self.subs[name] = _Sub(name, topic, settings, now)
        return SubscriptionInfo(name, topic, settings, now, SubscriptionCounts())

    def _sub(self, name: str) -> _Sub:
        try:
            return self.subs[name]
        except KeyError:
            raise SubscriptionNotFound(f"subscription {name!r} does not exist") from None

    async def get_subscription(self, name: str, now: datetime) -> SubscriptionInfo:
        s = self._sub(name)
        ready = delayed = leased = dead = 0
        for r in self.rows.values():
            if r.subscription != name:
                continue
            if r.state == DeliveryState.DEAD:
                dead += 1
            elif r.state == DeliveryState.LEASED:
                leased += 1
            elif r.available_at > now:
                delayed += 1
            else:
                ready += 1
        counts = SubscriptionCounts(ready, delayed, leased, dead)
        return SubscriptionInfo(s.name, s.topic, s.settings, s.created_at, counts)

    async def list_subscriptions(self, topic: str | None) -> list[SubscriptionInfo]:
        if topic is not None and topic not in self.topics:
            raise TopicNotFound(f"topic {topic!r} does not exist")
        return [
            SubscriptionInfo(s.name, s.topic, s.settings, s.created_at)
            for s in sorted(self.subs.values(), key=lambda s: s.name)
            if topic is None or s.topic == topic
        ]

    async def delete_subscription(
        self, name: str, *, force: bool, now: datetime, actor: Actor | None = None
    ) -> None:
        self._sub(name)
        mine = [k for k, r in self.rows.items() if r.subscription == name]
        if mine and not force:
            raise NotEmpty(f"subscription {name!r} still holds {len(mine)} messages; use force")
        for k in mine:
            del self.rows[k]
        del self.subs[name]

    # -- publish -------------------------------------------------------------------------------
    async def publish(
        self, messages: Sequence[PreparedMessage], retention: timedelta
    ) -> list[PublishResult]:
        for m in messages:
            if m.topic not in self.topics:
                raise TopicNotFound(f"topic {m.topic!r} does not exist")
        results: list[PublishResult] = []
        fresh: list[PreparedMessage] = []
        claims: dict[tuple[str, str, str], tuple[uuid.UUID, bytes, datetime]] = {}
        for m in messages:
            if m.idempotency_key is None:
                results.append(PublishResult(m.id))
                fresh.append(m)
                continue
            k = (m.topic, m.producer_scope, m.idempotency_key)
            prior = claims.get(k) or self.idem.get(k)
            if prior is not None and prior[2] > m.published_at - retention:
                if prior[1] != m.fingerprint:
                    raise IdempotencyConflict(
                        f"idempotency key {m.idempotency_key!r} was used for a different message"
                    )
                results.append(PublishResult(prior[0], duplicate=True))
                continue
            claims[k] = (m.id, m.fingerprint, m.published_at)
            results.append(PublishResult(m.id))
            fresh.append(m)
        self.idem.update(claims)
        for m in fresh:
            seq = next(self._seq)
            self.messages[m.id] = (seq, m)
            for s in self.subs.values():
                if s.topic == m.topic:
                    self.rows[(m.id, s.name)] = _Row(
                        message_id=m.id,
                        subscription=s.name,
                        seq=seq,
                        available_at=m.not_before or m.published_at,
                        ordering_key=m.ordering_key,
                        expires_at=m.expires_at,
                    )
        return results

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
        sub = self._sub(subscription)
        until = now + (lease_for or sub.settings.lease)
        live = [
            r
            for r in self.rows.values()
            if r.subscription == subscription and r.state != DeliveryState.DEAD
        ]
        blocked_before: dict[str, int] = {}
        for r in live:
            if r.ordering_key is not None:
                cur = blocked_before.get(r.ordering_key)
                blocked_before[r.ordering_key] = r.seq if cur is None else min(cur, r.seq)
        eligible = sorted(
            (
                r
                for r in live
                if r.available_at <= now
                and r.attempts < sub.settings.max_attempts
                and (r.expires_at is None or r.expires_at > now)
                and (r.ordering_key is None or blocked_before[r.ordering_key] == r.seq)
            ),
            key=lambda r: (r.available_at, r.seq),
        )[:max_count]
        out: list[Delivery] = []
        for r in eligible:
            if r.state == DeliveryState.LEASED:
                r.history.append(_expired_entry(r))
            r.state = DeliveryState.LEASED
            r.attempts += 1
            r.lease_token = uuid.uuid4()
            r.lease_expires_at = until
            r.available_at = until
            r.consumer = consumer
            out.append(self._delivery(r))
        out.sort(key=lambda d: self.messages[d.message_id][0])
        return out

    def _delivery(self, r: _Row) -> Delivery:
        _, m = self.messages[r.message_id]
        assert r.lease_token is not None and r.lease_expires_at is not None
        return Delivery(
            subscription=r.subscription,
            topic=m.topic,
            message_id=m.id,
            lease_token=r.lease_token,
            lease_expires_at=r.lease_expires_at,
            attempt=r.attempts,
            payload=m.payload,
            attributes=m.attributes,
            content_type=m.content_type,
            idempotency_key=m.idempotency_key,
            ordering_key=m.ordering_key,
            published_at=m.published_at,
            producer=m.producer,
            trace_context=m.trace_context,
        )

    def _owned(self, ref: SettleRef | NackRef) -> _Row | BrokerError:
        if ref.subscription not in self.subs:
            return SubscriptionNotFound(f"subscription {ref.subscription!r} does not exist")
        r = self.rows.get((ref.message_id, ref.subscription))
        if r is None or r.state != DeliveryState.LEASED or r.lease_token != ref.lease_token:
            return StaleLease(STALE)
        return r

    async def ack(self, refs: Sequence[SettleRef], now: datetime) -> list[BrokerError | None]:
        out: list[BrokerError | None] = []
        for ref in refs:
            r = self._owned(ref)
            if isinstance(r, BrokerError):
                out.append(r)
                continue
            del self.rows[(ref.message_id, ref.subscription)]
            if not any(k[0] == ref.message_id for k in self.rows):
                self.messages.pop(ref.message_id, None)
            out.append(None)
        return out

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
        prior = self.settles.get((scope, settle_id))
        if prior is not None and prior[1] > now - retention:
            if prior[2] != fingerprint:
                raise IdempotencyConflict(
                    f"settle id {settle_id!r} was used for a different settle; nothing was "
                    "acked or published"
                )
            return SettleOutcome(list(prior[0]), duplicate=True)
        seen: set[tuple[uuid.UUID, str]] = set()
        for ref in acks:  # all acks must be valid before anything changes
            r = self._owned(ref)
            if (ref.message_id, ref.subscription) in seen:
                r = StaleLease(STALE)
            seen.add((ref.message_id, ref.subscription))
            if isinstance(r, BrokerError):
                raise type(r)(
                    f"settle {settle_id!r}: {r.message} (message {ref.message_id} on "
                    f"{ref.subscription}); nothing was acked or published"
                )
        published = await self.publish(messages, retention) if messages else []
        await self.ack(acks, now)
        self.settles[(scope, settle_id)] = (list(published), now, fingerprint)
        return SettleOutcome(published)

    async def nack(
        self, refs: Sequence[NackRef], now: datetime, policy: RetryPolicy
    ) -> list[BrokerError | None]:
        out: list[BrokerError | None] = []
        for ref in refs:
            r = self._owned(ref)
            if isinstance(r, BrokerError):
                out.append(r)
                continue
            settings = self.subs[ref.subscription].settings
            r.history.append(
                {
                    "attempt": r.attempts,
                    "outcome": "nacked",
                    "at": now.isoformat(),
                    "consumer": r.consumer,
                    "error": ref.error,
                }
            )
            r.last_error = ref.error
            r.lease_token = None
            r.lease_expires_at = None
            if r.attempts >= settings.max_attempts:
                r.state = DeliveryState.DEAD
                r.dead_reason = DeadReason.MAX_ATTEMPTS
                r.dead_at = now
            else:
                delay = ref.delay if ref.delay is not None else policy.delay(r.attempts, settings)
                r.state = DeliveryState.READY
                r.available_at = now + delay
            out.append(None)
        return out

    async def extend(self, ref: SettleRef, lease_for: timedelta, now: datetime) -> datetime:
        r = self._owned(ref)
        if isinstance(r, BrokerError):
            raise r
        r.lease_expires_at = r.available_at = now + lease_for
        return r.lease_expires_at

    # -- maintenance ---------------------------------------------------------------------------
    async def sweep(self, now: datetime, limit: int) -> SweepResult:
        expired = exhausted = 0
        for r in list(self.rows.values()):
            if expired + exhausted >= limit:
                break
            sub = self.subs[r.subscription]
            if r.state == DeliveryState.READY and r.expires_at is not None and r.expires_at <= now:
                r.state, r.dead_reason, r.dead_at = DeliveryState.DEAD, DeadReason.EXPIRED, now
                r.history.append({"outcome": "expired", "at": now.isoformat()})
                expired += 1
            elif (
                r.state == DeliveryState.LEASED
                and r.available_at <= now
                and r.attempts >= sub.settings.max_attempts
            ):
                r.history.append(_expired_entry(r))
                r.state, r.dead_reason, r.dead_at = DeliveryState.DEAD, DeadReason.MAX_ATTEMPTS, now
                r.last_error = "lease expired"
                r.lease_token = r.lease_expires_at = None
                exhausted += 1
        return SweepResult(expired, exhausted)

    async def cleanup(
        self, now: datetime, idempotency_retention: timedelta, grace: timedelta, limit: int
    ) -> CleanupResult:
        referenced = {k[0] for k in self.rows}
        gone = [
            mid
            for mid, (_, m) in self.messages.items()
            if mid not in referenced and m.published_at < now - grace
        ][:limit]
        for mid in gone:
            del self.messages[mid]
        old = [k for k, v in self.idem.items() if v[2] < now - idempotency_retention][:limit]
        for k in old:
            del self.idem[k]
        for s in [k for k, v in self.settles.items() if v[1] < now - idempotency_retention]:
            del self.settles[s]
        return CleanupResult(len(gone), len(old))

    # -- dead letters and purge ----------------------------------------------------------------
    async def list_dead(
        self, subscription: str, limit: int, after: uuid.UUID | None
    ) -> list[DeadLetter]:
        self._sub(subscription)
        rows = sorted(
            (
                r
                for r in self.rows.values()
                if r.subscription == subscription
                and r.state == DeliveryState.DEAD
                and (after is None or r.message_id > after)
            ),
            key=lambda r: r.message_id,
        )[:limit]
        out = []
        for r in rows:
            _, m = self.messages[r.message_id]
            assert r.dead_at is not None and r.dead_reason is not None
            out.append(
                DeadLetter(
                    subscription=subscription,
                    topic=m.topic,
                    message_id=m.id,
                    idempotency_key=m.idempotency_key,
                    attempts=r.attempts,
                    reason=r.dead_reason,
                    last_error=r.last_error,
                    dead_at=r.dead_at,
                    published_at=m.published_at,
                    history=tuple(dict(h) for h in r.history),
                )
            )
        return out

    async def redrive(
        self,
        subscription: str,
        message_ids: Sequence[uuid.UUID] | None,
        now: datetime,
        *,
        actor: Actor | None = None,
    ) -> int:
        self._sub(subscription)
        wanted = None if message_ids is None else set(message_ids)
        n = 0
        for r in self.rows.values():
            if (
                r.subscription == subscription
                and r.state == DeliveryState.DEAD
                and (wanted is None or r.message_id in wanted)
            ):
                r.history.append(
                    {"outcome": "redriven", "at": now.isoformat(), "attempts": r.attempts}
                )
                r.state, r.attempts, r.available_at = DeliveryState.READY, 0, now
                r.dead_reason = r.dead_at = r.expires_at = None
                n += 1
        return n

    async def purge(
        self,
        subscription: str,
        *,
        dead: bool,
        now: datetime,
        actor: Actor | None = None,
    ) -> int:
        self._sub(subscription)
        doomed = [
            k
            for k, r in self.rows.items()
            if r.subscription == subscription and (r.state == DeliveryState.DEAD) == dead
        ]
        for k in doomed:
            del self.rows[k]
        return len(doomed)

    async def close(self) -> None:
        return None


def _expired_entry(r: _Row) -> dict[str, Any]:
    return {
        "attempt": r.attempts,
        "outcome": "lease_expired",
        "at": r.lease_expires_at.isoformat() if r.lease_expires_at else None,
        "consumer": r.consumer,
    }
