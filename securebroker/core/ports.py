"""The store port: what the core needs from persistence, and nothing about how.

Two adapters implement it: ``securebroker.store.postgres.PostgresStore`` (production) and
``securebroker.store.memory.MemoryStore`` (unit tests). Both are held to one contract test
suite. Every method is one transaction: it either takes effect entirely or not at all.
Batch forms exist because group commit (many requests per transaction) is how the broker is fast.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from securebroker.audit.record import Actor
from securebroker.core.model import (
    CleanupResult,
    DeadLetter,
    Delivery,
    NackRef,
    PreparedMessage,
    PublishResult,
    SettleOutcome,
    SettleRef,
    SubscriptionInfo,
    SubscriptionSettings,
    SweepResult,
    TopicInfo,
)
from securebroker.errors import BrokerError


class RetryPolicy(Protocol):
    def delay(self, attempt: int, settings: SubscriptionSettings) -> timedelta:
        """Backoff before redelivery after the ``attempt``-th failed attempt (1-based)."""
        ...


class Store(Protocol):
    # -- topics and subscriptions ------------------------------------------------------------
    # Methods that change state take the ``actor`` who asked (for the audit trail, which
    # stores with auditing write in the same transaction as the change).
    async def create_topic(
        self, name: str, now: datetime, *, actor: Actor | None = None
    ) -> TopicInfo: ...
    async def get_topic(self, name: str) -> TopicInfo: ...
    async def list_topics(self) -> list[TopicInfo]: ...
    async def delete_topic(
        self, name: str, *, force: bool, now: datetime, actor: Actor | None = None
    ) -> None: ...

    async def create_subscription(
        self,
        name: str,
        topic: str,
        settings: SubscriptionSettings,
        now: datetime,
        *,
        actor: Actor | None = None,
    ) -> SubscriptionInfo: ...
    async def get_subscription(self, name: str, now: datetime) -> SubscriptionInfo: ...
    async def list_subscriptions(self, topic: str | None) -> list[SubscriptionInfo]: ...
    async def delete_subscription(
        self, name: str, *, force: bool, now: datetime, actor: Actor | None = None
    ) -> None: ...

    # -- the message path --------------------------------------------------------------------
    async def publish(
        self, messages: Sequence[PreparedMessage], retention: timedelta
    ) -> list[PublishResult]:
        """Store all messages atomically, fanning out to every subscription of their topic.

        Idempotency: a message whose (topic, producer_scope, idempotency_key) was stored within
        ``retention`` returns the original id with ``duplicate=True`` when the fingerprint
        matches, and raises ``IdempotencyConflict`` (nothing stored) when it does not.
        """
        ...

    async def lease(
        self,
        subscription: str,
        max_count: int,
        lease_for: timedelta | None,
        consumer: str,
        now: datetime,
        *,
        actor: Actor | None = None,
    ) -> list[Delivery]: ...

    async def ack(self, refs: Sequence[SettleRef], now: datetime) -> list[BrokerError | None]:
        """Settle each delivery whose token still owns it; per-item result, same order."""
        ...

    async def nack(
        self, refs: Sequence[NackRef], now: datetime, policy: RetryPolicy
    ) -> list[BrokerError | None]: ...

    async def extend(self, ref: SettleRef, lease_for: timedelta, now: datetime) -> datetime: ...

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
        """Atomic settle: ack every delivery and publish every message in one transaction, or
        nothing (a stale lease raises ``StaleLease`` naming the message; a publish error
        raises as ``publish`` does). ``(scope, settle_id)`` seen within ``retention`` returns
        the first outcome with ``duplicate=True`` and changes nothing, if ``fingerprint`` (what
        is settled) is the same; otherwise it raises ``IdempotencyConflict``."""
        ...

    # -- maintenance ---------------------------------------------------------------------------
    async def sweep(self, now: datetime, limit: int) -> SweepResult:
        """Dead-letter expired messages and leases that ran out on their last attempt."""
        ...

    async def cleanup(
        self, now: datetime, idempotency_retention: timedelta, grace: timedelta, limit: int
    ) -> CleanupResult:
        """Delete settled messages and idempotency keys past retention, in bounded batches."""
        ...

    # -- dead letters and purge ----------------------------------------------------------------
    async def list_dead(
        self, subscription: str, limit: int, after: uuid.UUID | None
    ) -> list[DeadLetter]: ...
    async def redrive(
        self,
        subscription: str,
        message_ids: Sequence[uuid.UUID] | None,
        now: datetime,
        *,
        actor: Actor | None = None,
    ) -> int: ...
    async def purge(
        self,
        subscription: str,
        *,
        dead: bool,
        now: datetime,
        actor: Actor | None = None,
    ) -> int: ...

    async def close(self) -> None: ...


class OpenedPayload(Protocol):
    @property
    def payload(self) -> bytes: ...

    @property
    def error(self) -> str | None: ...


class PayloadSealer(Protocol):
    """Encryption at rest, as the core sees it (``securebroker.crypto.envelope.Envelope``)."""

    def scope_for(self, topic: str, attributes: Mapping[str, str]) -> str: ...

    def ready(self, scopes: Iterable[str]) -> bool:
        """True when ``seal`` can run for every scope without I/O."""
        ...

    async def prepare(self, scopes: Iterable[str]) -> None: ...

    def seal(self, message_id: uuid.UUID, topic: str, scope: str, payload: bytes) -> bytes: ...

    async def open_many(
        self, items: Sequence[tuple[uuid.UUID, str, bytes]]
    ) -> Sequence[OpenedPayload]: ...
