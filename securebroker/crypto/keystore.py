"""Where wrapped DEKs live: the ``sb_deks`` table (or memory, for unit tests).

Only wrapped DEK bytes are stored, with the KEK version that wrapped them and the scope they
serve. Destroying a scope sets ``wrapped`` to NULL; see ``securebroker.crypto.envelope`` for why
that alone is not the whole shredding story (old copies in WAL and backups are made unreadable
by rotating and retiring the KEK as well).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

import asyncpg

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


class PostgresKeyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert(self, dek: StoredDek, now: datetime) -> None:
        async with self.pool.acquire() as c:
            await c.execute(Q["dek_insert"], dek.id, dek.scope, dek.kek_version, dek.wrapped, now)

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
        async with self.pool.acquire() as c:
            status = await c.execute(
                Q["dek_rewrap_one"], dek.id, dek.kek_version, dek.wrapped, old_version
            )
        return bool(status.endswith(" 1"))

    async def destroy_scope(self, scope: str, now: datetime) -> int:
        async with self.pool.acquire() as c, c.transaction():
            rows = await c.fetch(Q["dek_destroy_scope"], scope, now)
            await c.execute(Q["keys_notify"], f"destroy:{scope}")
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
