"""The ``sb_outbox`` table in the producer's database: install it, write to it, trim it.

``enqueue`` is a plain ``INSERT`` on the caller's connection: the row commits or rolls back with
the caller's transaction, together with the business rows it describes. Nothing here talks to
the broker; ``OutboxRelay`` (``securebroker.outbox.relay``) does that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import LiteralString, TypeAlias

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from securebroker.errors import ProtocolError, ValidationError
from securebroker.ids import uuid7
from securebroker.protocol import frames as f
from securebroker.store.sql import parse
from securebroker.telemetry import propagation

Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

DEFAULT_CONTENT_TYPE = "application/octet-stream"
TABLE = "sb_outbox"


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


QUERIES: dict[str, LiteralString] = parse(_read("queries.sql"))
#: the whole schema script (several statements; run without parameters)
SCHEMA: LiteralString = _read("schema.sql")


async def install(conn: Conn) -> None:
    """Create ``sb_outbox`` and its indexes in the producer's database if missing.

    Idempotent, and safe from several processes at once (an advisory lock serialises
    installers). Runs in a transaction (a savepoint if the caller already has one)."""
    async with conn.transaction():
        await conn.execute(QUERIES["install_lock"])
        await conn.execute(SCHEMA)


async def installed(conn: Conn) -> bool:
    """Whether ``sb_outbox`` exists (on the connection's search path)."""
    return bool(await conn.fetchval(QUERIES["installed"]))


def check_message(
    topic: str,
    payload: bytes,
    *,
    key: str,
    ordering_key: str | None,
    attributes: Mapping[str, str],
    content_type: str,
    trace_context: Mapping[str, str],
) -> None:
    """Raise ``ValidationError`` for a message the broker's protocol could never carry.

    Checked at enqueue, inside the producer's transaction, so a row that can never be sent
    never enters the outbox. The limits are the protocol's maxima; a broker configured with
    lower limits rejects such rows at publish time (the relay records and retries them)."""
    try:
        item = msgspec.convert(
            {
                "topic": topic,
                "payload": payload,
                "attributes": dict(attributes),
                "content_type": content_type,
                "idempotency_key": key,
                "ordering_key": ordering_key,
                "trace_context": dict(trace_context),
            },
            f.PublishItem,
        )
        f.validate(f.Publish(message=item), f.Limits())
    except (msgspec.ValidationError, ProtocolError) as exc:
        # msgspec and the frame validator name the field and the limit, never the value
        raise ValidationError(f"outbox message rejected: {exc}") from None


async def enqueue(
    conn: Conn,
    topic: str,
    payload: bytes,
    *,
    key: str | None = None,
    ordering_key: str | None = None,
    attributes: Mapping[str, str] | None = None,
    content_type: str = DEFAULT_CONTENT_TYPE,
    trace_context: Mapping[str, str] | None = None,
) -> str:
    """Write one message to the outbox in the caller's transaction; returns its key.

    ``key`` is the broker idempotency key the relay will publish with (default: a fresh
    UUIDv7 string). It is unique in the table: enqueueing a key that is already there raises
    ``asyncpg.UniqueViolationError`` and aborts the caller's transaction, as any constraint
    would. Without ``trace_context``, the current OpenTelemetry span's W3C context is stored
    (nothing when no span is active), so consumers link to the enqueuing trace.

    Raises ``ValidationError`` (nothing written) for a message the broker could never accept:
    a topic that is not a valid name, a key or ordering key over 255 characters, a payload
    over 1 MiB, too many or too large attributes."""
    if key is None:
        key = str(uuid7(datetime.now(UTC)))
    attrs = dict(attributes or {})
    if trace_context is None:
        tc: dict[str, str] = {}
        propagation.inject(tc)
    else:
        tc = dict(trace_context)
    data = bytes(payload)
    check_message(
        topic,
        data,
        key=key,
        ordering_key=ordering_key,
        attributes=attrs,
        content_type=content_type,
        trace_context=tc,
    )
    await conn.execute(
        QUERIES["enqueue"],
        key,
        topic,
        data,
        json.dumps(attrs),
        content_type,
        ordering_key,
        json.dumps(tc),
    )
    return key


async def purge_sent(conn: Conn, before: datetime, *, batch: int = 10_000) -> int:
    """Delete sent rows whose ``sent_at`` is before ``before``; returns how many.

    Deletes in batches of ``batch`` rows, each its own short statement, so a large backlog
    does not hold one long transaction. Unsent rows are never touched."""
    total = 0
    while True:
        status = await conn.execute(QUERIES["purge_sent"], before, batch)
        n = int(status.rsplit(" ", 1)[-1])
        total += n
        if n < batch:
            return total


__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "QUERIES",
    "SCHEMA",
    "TABLE",
    "Conn",
    "check_message",
    "enqueue",
    "install",
    "installed",
    "purge_sent",
]
