"""Where wrapped DEKs live: the ``sb_deks`` table (or memory, for unit tests).

Only wrapped DEK bytes are stored, with the KEK version that wrapped them and the scope they
serve. Destroying a scope sets ``wrapped`` to NULL; see ``securebroker.crypto.envelope`` for why
that alone is not the whole shredding story (old copies in WAL and backups are made unreadable
by rotating and retiring the KEK as well).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg

from securebroker.audit.events import key_event
from securebroker.audit.log import AuditLog
from securebroker.audit.record import BROKER, Actor, AuditEvent, Event, Scalar
from securebroker.store.sql import load

Q = load("keys.sql")
#: the NOTIFY channel brokers listen on for key events ("rotate", "destroy:<scope>")
CHANNEL = "sb_keys"


@dataclass(frozen=True, slots=True)
class StoredDek:
    id: uuid.UUID
    scope: str
    kek_version: int
    #: None once the scope was destroyed
    wrapped: bytes | None


@dataclass(frozen=True, slots=True)
class KekUsage:
    kek_version: int
    live: int
    destroyed: int


class KeyStore(Protocol):
    async def insert(self, dek: StoredDek, now: datetime) -> None: ...

    async def get_many(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StoredDek]: ...

    async def usage(self) -> list[KekUsage]: ...

    async def live_below(self, kek_version: int) -> int: ...

    async def rewrap_batch(self, below: int, limit: int) -> list[StoredDek]:
        """Live DEKs wrapped under a version < ``below``, oldest id first."""
        ...

    async def replace_wrapped(self, dek: StoredDek, old_version: int) -> bool:
        """Store a rewrapped DEK unless someone else changed it meanwhile; True if stored."""
        ...

    async def destroy_scope(self, scope: str, now: datetime) -> int:
        """Drop the wrapped DEKs of ``scope`` and tell running brokers; returns how many."""
        ...

    async def notify(self, event: str) -> None: ...

    def record_kek(self, event: Event, version: int, now: datetime, **detail: Scalar) -> None:
        """Record a keyring change (KEK rotated or retired) in the audit trail."""
        ...


class PostgresKeyStore:
    """DEKs in ``sb_deks``. With an ``audit`` log, every change to a DEK (created, rewrapped,
    destroyed) is recorded in the same transaction, as done by ``actor``."""

    def __init__(
        self, pool: asyncpg.Pool, audit: AuditLog | None = None, actor: Actor = BROKER
    ) -> None:
        self.pool = pool
        self.audit = audit
        self.actor = actor

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[tuple[Any, list[AuditEvent] | None]]:
        if self.audit is None:
            async with self.pool.acquire() as c, c.transaction():
                yield c, None
        else:
            async with self.audit.transaction(self.pool) as (c, events):
                yield c, events

    def _event(
        self, event: Event, dek_id: uuid.UUID, now: datetime, **detail: Scalar
    ) -> AuditEvent:
        return key_event(event, now, self.actor, str(dek_id), detail)

    def record_kek(self, event: Event, version: int, now: datetime, **detail: Scalar) -> None:
        """A change to the keyring (KEK rotated, retired): outside the database, so recorded
        on its own."""
        if self.audit is not None:
            self.audit.record([key_event(event, now, self.actor, f"kek:v{version}", detail)])

    async def insert(self, dek: StoredDek, now: datetime) -> None:
        async with self._tx() as (c, events):
            await c.execute(Q["dek_insert"], dek.id, dek.scope, dek.kek_version, dek.wrapped, now)
            if events is not None:
                events.append(
                    self._event(
                        Event.KEY_CREATED, dek.id, now, scope=dek.scope, kek_version=dek.kek_version
                    )
                )

    async def get_many(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StoredDek]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(Q["dek_get_many"], list(ids))
        return {r["id"]: _dek(r) for r in rows}

    async def usage(self) -> list[KekUsage]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(Q["dek_counts"])
        return [KekUsage(r["kek_version"], r["live"], r["destroyed"]) for r in rows]

    async def live_below(self, kek_version: int) -> int:
        async with self.pool.acquire() as c:
            n: int = await c.fetchval(Q["dek_live_below"], kek_version)
        return n

    async def rewrap_batch(self, below: int, limit: int) -> list[StoredDek]:
        async with self.pool.acquire() as c:
            rows = await c.fetch(Q["dek_rewrap_batch"], below, limit)
        return [_dek(r) for r in rows]

    async def replace_wrapped(self, dek: StoredDek, old_version: int) -> bool:
        async with self._tx() as (c, events):
            status = await c.execute(
                Q["dek_rewrap_one"], dek.id, dek.kek_version, dek.wrapped, old_version
            )
            done = bool(status.endswith(" 1"))
            if done and events is not None:
                events.append(
                    self._event(
                        Event.KEY_REWRAPPED,
                        dek.id,
                        datetime.now(UTC),
                        scope=dek.scope,
                        from_kek_version=old_version,
                        kek_version=dek.kek_version,
                    )
                )
        return done

    async def destroy_scope(self, scope: str, now: datetime) -> int:
        async with self._tx() as (c, events):
            rows = await c.fetch(Q["dek_destroy_scope"], scope, now)
            await c.execute(Q["keys_notify"], f"destroy:{scope}")
            if events is not None:
                events.extend(
                    self._event(Event.KEY_DESTROYED, r["id"], now, scope=scope) for r in rows
                )
        return len(rows)

    async def notify(self, event: str) -> None:
        async with self.pool.acquire() as c:
            await c.execute(Q["keys_notify"], event)


def _dek(r: asyncpg.Record) -> StoredDek:
    wrapped = r["wrapped"]
    return StoredDek(
        r["id"], r["scope"], r["kek_version"], None if wrapped is None else bytes(wrapped)
    )


class MemoryKeyStore:
    """The same behaviour in memory, for unit tests and the in-memory store."""

    def __init__(self) -> None:
        self.deks: dict[uuid.UUID, StoredDek] = {}
        self.events: list[str] = []
        #: keyring changes ``record_kek`` was told of
        self.audited: list[str] = []

    async def insert(self, dek: StoredDek, now: datetime) -> None:
        self.deks[dek.id] = dek

    async def get_many(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StoredDek]:
        return {i: self.deks[i] for i in ids if i in self.deks}

    async def usage(self) -> list[KekUsage]:
        out: dict[int, list[int]] = {}
        for d in self.deks.values():
            counts = out.setdefault(d.kek_version, [0, 0])
            counts[0 if d.wrapped is not None else 1] += 1
        return [KekUsage(v, live, dead) for v, (live, dead) in sorted(out.items())]

    async def live_below(self, kek_version: int) -> int:
        return sum(
            1 for d in self.deks.values() if d.wrapped is not None and d.kek_version < kek_version
        )

    async def rewrap_batch(self, below: int, limit: int) -> list[StoredDek]:
        todo = [d for d in self.deks.values() if d.wrapped is not None and d.kek_version < below]
        return sorted(todo, key=lambda d: d.id)[:limit]

    async def replace_wrapped(self, dek: StoredDek, old_version: int) -> bool:
        cur = self.deks.get(dek.id)
        if cur is None or cur.wrapped is None or cur.kek_version != old_version:
            return False
        self.deks[dek.id] = dek
        return True

    async def destroy_scope(self, scope: str, now: datetime) -> int:
        hit = [d for d in self.deks.values() if d.scope == scope and d.wrapped is not None]
        for d in hit:
            self.deks[d.id] = replace(d, wrapped=None)
        self.events.append(f"destroy:{scope}")
        return len(hit)

    async def notify(self, event: str) -> None:
        self.events.append(event)

    def record_kek(self, event: Event, version: int, now: datetime, **detail: Scalar) -> None:
        self.audited.append(f"{event}:v{version}")
