"""The outbox relay: publishes pending ``sb_outbox`` rows to the broker, each exactly once.

One pass (``relay_once``) is one transaction on one pooled connection of the producer's
database, held while that pass publishes:

1. claim: lock up to ``batch`` due rows (``sent_at IS NULL AND next_attempt_at <= now``) in id
   order with ``FOR UPDATE SKIP LOCKED``; keep those whose ordering key has no earlier unsent
   row outside this claim (the ``claim`` query in ``queries.sql``);
2. publish, with ``idempotency_key = row.key``: rows without an ordering key in
   ``publish_batch`` calls, each (topic, ordering key) sequence one message at a time in id
   order, all of it concurrently on the one client;
3. record, in the same transaction: confirmed rows get ``sent_at`` and ``message_id``; failed
   rows get ``attempts``, ``last_error`` (the error code) and a backed-off ``next_attempt_at``;
   later rows of a failed row's ordering key are left as they were;
4. commit.

A relay that dies anywhere before 4 leaves its rows unsent and unlocked; the next pass (of any
replica) publishes them again with the same keys and the broker answers ``duplicate=True`` with
the original ids (counted in ``stats.duplicates``): one message in the broker per row.

Which task owns what: a pass owns its pooled connection and transaction from claim to commit;
the ``Client`` is shared (requests are pipelined on its one connection) and owned by the caller,
who also closes it and the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from securebroker.client import Client, OutgoingMessage
from securebroker.clock import Clock
from securebroker.core.model import PublishResult
from securebroker.errors import BrokerError
from securebroker.outbox.table import QUERIES, Conn
from securebroker.protocol import frames as f

log = logging.getLogger("securebroker.outbox")

#: what one ``publish_batch`` frame may carry: the protocol's default frame size minus room for
#: headers, so a full chunk never exceeds a default-configured broker's ``max_frame``
_CHUNK_BYTES = f.MAX_FRAME - f.FRAME_OVERHEAD
#: bytes of one encoded item beyond its strings and payload (field names, map and bin headers)
_ITEM_OVERHEAD = 128

#: errors a pass may meet that ``run`` logs and retries after a pause (anything else is a bug
#: and ends ``run``)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    BrokerError,
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One claimed row, as the relay publishes it."""

    id: int
    key: str
    topic: str
    payload: bytes
    attributes: dict[str, str]
    content_type: str
    ordering_key: str | None
    trace_context: dict[str, str]
    #: publish attempts made before this one
    attempts: int

    def message(self) -> OutgoingMessage:
        return OutgoingMessage(
            topic=self.topic,
            payload=self.payload,
            attributes=self.attributes,
            content_type=self.content_type,
            idempotency_key=self.key,
            ordering_key=self.ordering_key,
            trace_context=self.trace_context,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What publishing one row came to: a confirm, or the error code of a failure."""

    row: OutboxRow
    result: PublishResult | None = None
    error: str | None = None
    retryable: bool = True


@dataclass
class RelayStats:
    """Counters since the relay was created (all replicas count their own)."""

    #: rows marked sent (committed)
    sent: int = 0
    #: publish attempts that failed (each recorded with backoff)
    failed: int = 0
    #: sent rows the broker reported as duplicates (a republish after an earlier pass died
    #: between the broker's confirm and its own commit)
    duplicates: int = 0
    #: passes that ended in an error before committing (database or client trouble)
    errors: int = 0


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> timedelta:
    """``base * 2**(attempt-1)`` seconds capped at ``cap``, with equal jitter (half fixed, half
    random), as the broker's redelivery backoff."""
    exp = min(cap, base * (2 ** min(max(attempt - 1, 0), 62)))
    return timedelta(seconds=exp / 2 + rng.uniform(0, exp / 2))


def error_code(exc: BaseException) -> str:
    """What ``last_error`` records: the catalogue code of a broker error, else the class name.
    Never the message text (it could quote a payload)."""
    if isinstance(exc, BrokerError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


def _row(r: asyncpg.Record) -> OutboxRow:
    return OutboxRow(
        id=r["id"],
        key=r["key"],
        topic=r["topic"],
        payload=bytes(r["payload"]),
        attributes=json.loads(r["attributes"]),
        content_type=r["content_type"],
        ordering_key=r["ordering_key"],
        trace_context=json.loads(r["trace_context"]),
        attempts=r["attempts"],
    )


def _item_bytes(row: OutboxRow) -> int:
    """An upper estimate of one item's encoded size in a PUBLISH_BATCH frame."""
    text = [row.topic, row.key, row.content_type, row.ordering_key or ""]
    text += [s for kv in (*row.attributes.items(), *row.trace_context.items()) for s in kv]
    return len(row.payload) + sum(len(s.encode()) + 5 for s in text) + _ITEM_OVERHEAD


def _chunks(rows: Sequence[OutboxRow]) -> list[list[OutboxRow]]:
    """Split rows into ``publish_batch`` calls that fit one frame (count and bytes)."""
    out: list[list[OutboxRow]] = []
    current: list[OutboxRow] = []
    size = 0
    for row in rows:
        n = _item_bytes(row)
        if current and (len(current) >= f.MAX_BATCH or size + n > _CHUNK_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(row)
        size += n
    if current:
        out.append(current)
    return out


class OutboxRelay:
    """Publishes the outbox of the database behind ``pool`` through ``client``.

    ``run(stop)`` loops until ``stop`` is set (passes back to back while full batches come
    back, else one every ``poll`` seconds); ``relay_once()`` is one pass. Several relays (in
    one process or many) may share one outbox: they never publish a row concurrently and keep
    each ordering key's order.

    ``backoff_base``/``backoff_max`` (seconds) shape the retry delay of a failed row;
    ``publish_timeout`` bounds each publish (the pass holds its transaction meanwhile).
    ``clock`` is the time the relay compares ``next_attempt_at`` with and writes (default: the
    database's ``now()``); ``rng`` draws the jitter. Both are for tests.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: Client,
        *,
        batch: int = 100,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        poll: float = 0.25,
        publish_timeout: float = 30.0,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if not 0 < backoff_base <= backoff_max:
            raise ValueError("need 0 < backoff_base <= backoff_max")
        if poll <= 0 or publish_timeout <= 0:
            raise ValueError("poll and publish_timeout must be positive")
        self.pool = pool
        self.client = client
        self.batch = batch
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.poll = poll
        self.publish_timeout = publish_timeout
        self.clock = clock
        self._rng = rng or random.SystemRandom()
        self.stats = RelayStats()

    # -- the loop ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; the pass in progress then finishes and commits.

        A pass that fails as a whole (database or broker connection trouble) is logged and
        retried after a growing pause; any other exception ends ``run``. Cancelling the task
        abandons the pass in progress: its transaction rolls back and its rows are published
        again (as duplicates the broker recognises) by a later pass."""
        failures = 0
        while not stop.is_set():
            try:
                claimed, sent = await self._pass()
            except TRANSIENT_ERRORS as exc:
                failures += 1
                self.stats.errors += 1
                pause = backoff_delay(
                    failures, base=self.backoff_base, cap=self.backoff_max, rng=self._rng
                ).total_seconds()
                log.warning(
                    "outbox relay pass failed (%s); retrying in %.1fs", error_code(exc), pause
                )
                await _wait(stop, pause)
                continue
            failures = 0
            if claimed < self.batch or sent == 0:
                await _wait(stop, self.poll)

    async def relay_once(self) -> int:
        """One pass: publish one batch of due rows; returns how many were marked sent."""
        return (await self._pass())[1]

    # -- one pass ------------------------------------------------------------------------------
    async def _pass(self) -> tuple[int, int]:
        """One pass; returns (rows claimed and eligible, rows marked sent)."""
        now = self._now()
        async with self.pool.acquire() as conn, conn.transaction():
            rows = [_row(r) for r in await conn.fetch(QUERIES["claim"], now, self.batch)]
            if not rows:
                return 0, 0
            outcomes = await self._publish(rows)
            await self._record(conn, outcomes)
        sent = [o for o in outcomes if o.result is not None]
        self.stats.sent += len(sent)
        self.stats.duplicates += sum(1 for o in sent if o.result and o.result.duplicate)
        self.stats.failed += len(outcomes) - len(sent)
        return len(rows), len(sent)

    async def _publish(self, rows: Sequence[OutboxRow]) -> list[Outcome]:
        """Publish the claimed rows; one outcome per row attempted (rows after a failure in
        their ordering key are not attempted and get none)."""
        unkeyed = [r for r in rows if r.ordering_key is None]
        sequences: dict[tuple[str, str], list[OutboxRow]] = {}
        for r in rows:
            if r.ordering_key is not None:
                sequences.setdefault((r.topic, r.ordering_key), []).append(r)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._publish_chunk(c)) for c in _chunks(unkeyed)]
            tasks += [tg.create_task(self._publish_sequence(s)) for s in sequences.values()]
        return [o for t in tasks for o in t.result()]

    async def _publish_chunk(self, rows: list[OutboxRow]) -> list[Outcome]:
        """Rows without an ordering key, in one atomic ``publish_batch``. A batch refused for
        a reason that is not transient is retried row by row, so one bad row (a missing topic,
        a conflicting key) does not hold back the others."""
        try:
            async with asyncio.timeout(self.publish_timeout):
                results = await self.client.publish_batch([r.message() for r in rows])
        except (BrokerError, TimeoutError) as exc:
            if len(rows) > 1 and isinstance(exc, BrokerError) and not exc.retryable:
                return [await self._publish_one(r) for r in rows]
            return [self._failed(r, exc) for r in rows]
        return [Outcome(r, result=res) for r, res in zip(rows, results, strict=True)]

    async def _publish_sequence(self, rows: list[OutboxRow]) -> list[Outcome]:
        """The rows of one (topic, ordering key) in id order, each after the previous one's
        confirm; stops at the first failure."""
        out: list[Outcome] = []
        for r in rows:
            outcome = await self._publish_one(r)
            out.append(outcome)
            if outcome.result is None:
                break
        return out

    async def _publish_one(self, row: OutboxRow) -> Outcome:
        try:
            async with asyncio.timeout(self.publish_timeout):
                (result,) = await self.client.publish_batch([row.message()])
        except (BrokerError, TimeoutError) as exc:
            return self._failed(row, exc)
        return Outcome(row, result=result)

    def _failed(self, row: OutboxRow, exc: BaseException) -> Outcome:
        retryable = not isinstance(exc, BrokerError) or exc.retryable
        code = error_code(exc)
        if retryable:
            log.warning(
                "outbox row %d (topic %s): publish failed (%s), attempt %d; will retry",
                row.id,
                row.topic,
                code,
                row.attempts + 1,
            )
        else:
            # Not dropped: the row is retried with backoff, because what refused it (a
            # missing topic, a policy, a conflicting key) is fixed by an operator, not by
            # waiting; and an outbox row was committed as a promise to send.
            log.error(
                "outbox row %d (topic %s): broker refused it (%s), attempt %d; it stays in "
                "the outbox and is retried with backoff until the cause is fixed",
                row.id,
                row.topic,
                code,
                row.attempts + 1,
            )
        return Outcome(row, error=code, retryable=retryable)

    async def _record(self, conn: Conn, outcomes: Sequence[Outcome]) -> None:
        """Write the outcomes in the pass's transaction (still holding the row locks)."""
        sent = [(o.row.id, o.result.message_id) for o in outcomes if o.result is not None]
        failed = [o for o in outcomes if o.result is None]
        now = self._now()
        if sent:
            ids, message_ids = zip(*sent, strict=True)
            await conn.execute(QUERIES["mark_sent"], list(ids), list(message_ids), now)
        if failed:
            await conn.execute(
                QUERIES["mark_failed"],
                [o.row.id for o in failed],
                [o.error for o in failed],
                [self._delay(o.row.attempts + 1) for o in failed],
                now,
            )

    def _delay(self, attempt: int) -> timedelta:
        return backoff_delay(attempt, base=self.backoff_base, cap=self.backoff_max, rng=self._rng)

    def _now(self) -> datetime | None:
        return None if self.clock is None else self.clock.now()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Until ``stop`` is set or ``seconds`` have passed, whichever is first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


__all__ = [
    "TRANSIENT_ERRORS",
    "OutboxRelay",
    "OutboxRow",
    "Outcome",
    "RelayStats",
    "backoff_delay",
    "error_code",
]
