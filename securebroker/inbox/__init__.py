"""The consumer inbox: exactly-once *effects* on top of at-least-once delivery (DESIGN §3.7).

A consumer's handler runs inside the consumer's own database transaction, together with a row
that records the message id (``sb_inbox``). Only after that transaction commits is the message
settled with the broker: acked, and the handler's outputs published, in one atomic settle
(``Client.settle``). So:

- a crash before the commit leaves no effect and no row: the message is redelivered and
  handled as new;
- a crash after the commit and before the settle leaves the effect and the row: the redelivery
  finds the row, does NOT run the handler again, counts the redelivery, and settles with the
  outputs stored in the row (the settle id is derived from the message, so if the first settle
  did reach the broker the repeat is recognised and publishes nothing twice);
- a handler error rolls its transaction back and nacks the message (redelivery with backoff,
  dead letter after ``max_attempts``).

Usage::

    inbox = Inbox(pool, "payments")                 # pool: the consumer's own database
    async for message in client.consume("payments.requested.worker"):
        await inbox.process(message, handle)        # handle(conn, message) -> outputs

    async def handle(conn, message):
        await conn.execute("UPDATE accounts SET balance = balance - $1 ...", ...)
        return [OutgoingMessage("payments.completed", b"...")]
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import LiteralString, TypeAlias

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from securebroker.client import Message, OutgoingMessage
from securebroker.clock import from_ms, to_ms
from securebroker.core.model import PublishResult
from securebroker.errors import StaleLease
from securebroker.store.sql import parse

Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
#: ``handler(conn, message)``: the effect, in the consumer's transaction; returns the messages
#: to publish with the ack (or None)
Handler: TypeAlias = Callable[[Conn, Message], Awaitable[Sequence[OutgoingMessage] | None]]


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


QUERIES: dict[str, LiteralString] = parse(_read("queries.sql"))
SCHEMA: LiteralString = _read("schema.sql")


async def install(conn: Conn) -> None:
    """Create ``sb_inbox`` in the consumer's database if missing (idempotent, concurrency-safe)."""
    async with conn.transaction():
        await conn.execute(QUERIES["install_lock"])
        await conn.execute(SCHEMA)


class _Output(msgspec.Struct, frozen=True):
    topic: str
    payload: str  # base64
    attributes: dict[str, str] = {}
    content_type: str = "application/octet-stream"
    idempotency_key: str | None = None
    ordering_key: str | None = None
    trace_context: dict[str, str] = {}
    not_before_ms: int | None = None
    expires_at_ms: int | None = None


def _encode_outputs(outputs: Sequence[OutgoingMessage]) -> str:
    return msgspec.json.encode(
        [
            _Output(
                topic=m.topic,
                payload=base64.b64encode(bytes(m.payload)).decode(),
                attributes=dict(m.attributes),
                content_type=m.content_type,
                idempotency_key=m.idempotency_key,
                ordering_key=m.ordering_key,
                trace_context=dict(m.trace_context),
                not_before_ms=None if m.not_before is None else to_ms(m.not_before),
                expires_at_ms=None if m.expires_at is None else to_ms(m.expires_at),
            )
            for m in outputs
        ]
    ).decode()


def _decode_outputs(text: str | None) -> list[OutgoingMessage]:
    if not text:
        return []
    return [
        OutgoingMessage(
            o.topic,
            base64.b64decode(o.payload),
            o.attributes,
            o.content_type,
            o.idempotency_key,
            o.ordering_key,
            None if o.not_before_ms is None else from_ms(o.not_before_ms),
            None if o.expires_at_ms is None else from_ms(o.expires_at_ms),
            o.trace_context,
        )
        for o in msgspec.json.decode(text, type=list[_Output])
    ]


@dataclass(frozen=True)
class InboxResult:
    #: True when the handler ran (first sight); False for a recorded redelivery
    processed: bool
    #: the outputs' publish results (empty when none), as the atomic settle returned them
    outputs: list[PublishResult]
    #: False when the lease ran out before the settle: the message comes back, and its
    #: redelivery settles it (without running the handler again)
    settled: bool


class Inbox:
    def __init__(
        self,
        pool: asyncpg.Pool,
        name: str,
        *,
        retention: timedelta = timedelta(days=30),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``name`` identifies the consuming service: its rows are its own, so two services
        consuming the same message each take effect once. Use one name per subscription: the
        settle id is derived from the subscription, so one inbox fed by two subscriptions of a
        topic would take effect once but publish its outputs once per subscription. Keep rows
        (``retention``) longer than a message can be redelivered (the subscription's attempts
        times backoff, plus the dead-letter redrive window)."""
        if not name or len(name) > 255:
            raise ValueError("an inbox name is 1 to 255 characters")
        self.pool = pool
        self.name = name
        self.retention = retention
        self._now = clock

    async def process(self, message: Message, handler: Handler) -> InboxResult:
        """Take effect on ``message`` at most once, then settle it (ack + outputs, atomically).

        A handler exception rolls back its transaction, nacks the message (so it is
        redelivered later, or dead-lettered) and propagates."""
        try:
            outputs, processed = await self._take_effect(message, handler)
        except _HandlerFailed as failed:
            # the class name only: an error's text may quote the payload
            await message.nack(f"handler failed: {failed.error.__class__.__name__}")
            raise failed.error from None
        return await self._settle(message, outputs, processed)

    async def _take_effect(
        self, message: Message, handler: Handler
    ) -> tuple[list[OutgoingMessage], bool]:
        processed = False
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                QUERIES["claim"],
                self.name,
                message.id,
                message.subscription,
                message.topic,
                self._now(),
            )
            if claimed is not None:
                try:
                    outputs = list(await handler(conn, message) or ())
                except Exception as exc:  # any handler failure: roll back, nack
                    raise _HandlerFailed(exc) from exc
                if outputs:
                    await conn.execute(
                        QUERIES["set_outputs"], self.name, message.id, _encode_outputs(outputs)
                    )
                processed = True
            else:
                stored = await conn.fetchval(QUERIES["seen"], self.name, message.id)
                outputs = _decode_outputs(stored)
        return outputs, processed

    async def _settle(
        self, message: Message, outputs: list[OutgoingMessage], processed: bool
    ) -> InboxResult:
        try:
            outcome = await message.settle(outputs)
        except StaleLease:
            # our lease ran out first: the redelivery will find the row and settle it
            return InboxResult(processed, [], settled=False)
        await self.pool.execute(QUERIES["settled"], self.name, message.id, self._now())
        return InboxResult(processed, outcome.results, settled=True)

    async def trim(self, limit: int = 10_000) -> int:
        """Delete settled rows older than the retention; returns how many."""
        status = await self.pool.execute(
            QUERIES["trim"], self.name, self._now() - self.retention, limit
        )
        return int(status.rsplit(" ", 1)[-1])


class _HandlerFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
