"""The broker's audit writer: chains written inside store transactions, a queue for events that
have no transaction of their own, and signed checkpoints (ADR 0008).

Chains ("lanes"): a hash chain needs its predecessor's hash, and a single chain shared by every
transaction would serialise all commits of all broker processes on one row lock held through the
WAL flush. Instead each broker process keeps a small pool of lanes, one per concurrently running
transaction, like a connection pool. A lane is checked out for one transaction, its records are
hashed in Python from the lane's in-memory head, and the head advances only when that
transaction commits. A rolled-back transaction leaves the head as it was. A transaction whose
COMMIT outcome is unknown (connection lost, or the task cancelled while committing) retires its
lane: it is never written again, and the next checkpoint reads its final head back from the
database (by then the COMMIT has long been decided either way; reusing the lane at once could
race with a COMMIT still in progress and fork the chain). Checkpoints sign the heads the process
*knows* it wrote (from memory, not re-read from the table), so records deleted afterwards are
missing against the signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import asyncpg
import msgspec

from securebroker.audit.checkpoint import Checkpoint, Head, SigningKey
from securebroker.audit.record import (
    AuditEvent,
    AuditRecord,
    canonical,
    chain_hash,
    genesis,
    to_us,
)
from securebroker.clock import Clock, SystemClock
from securebroker.errors import Unavailable
from securebroker.store.sql import load

log = logging.getLogger("securebroker.audit")

Q = load("audit.sql")

Outcome = Literal["committed", "rolled_back", "unknown"]

_json = msgspec.json.Encoder(order="sorted").encode

#: events waiting for the background writer before further ones are counted, not queued
QUEUE_LIMIT = 10_000
#: errors that mean the database connection (or server) was lost
CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


def instance_name() -> str:
    """A name for this process's chains and checkpoints: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Lane:
    chain: int
    seq: int
    head: bytes
    head_at_us: int
    #: retired: never written again (after a COMMIT with an unknown outcome, or when the
    #: database connection was lost and an asynchronous commit may be gone with it)
    retired: bool = False
    #: retired and its head not yet read back from the table
    suspect: bool = False
    #: its final head was signed: forget it
    done: bool = False
    #: the time of the head record (``head_at_us`` as a datetime), see ``stage``
    head_at: datetime | None = None

    def stage(self, events: Sequence[AuditEvent]) -> list[Row]:
        """Hash ``events`` after the head, as rows of ``sb_audit``; the head itself moves only
        on ``advance``. (The hot path of auditing: rows are built directly, with the same
        canonical bytes as ``record.seal``, which the tests hold it to.)"""
        out: list[Row] = []
        chain, seq, prev = self.chain, self.seq, self.head
        floor = self.head_at
        last_at: datetime | None = None
        at_us = 0
        for ev in events:
            seq += 1
            at = ev.at
            # Time never goes back within a chain: an event stamped when its request began may
            # be written after a later one (a queued denial, a grouped publish). Export windows
            # and retention cut chains by time, so a chain must be ordered by it too.
            if floor is not None and at < floor:
                at = floor
            floor = at
            if at is not last_at:  # events of one transaction mostly share their time
                at_us, last_at = to_us(at), at
            a = ev.actor
            # encoded once: the stored column, and (as raw JSON) inside the hashed bytes
            detail = _json(ev.detail) if ev.detail else b"{}"
            ids, traces = ev.message_ids, ev.trace_ids
            h = chain_hash(
                prev,
                canonical(
                    chain, seq, at_us, ev.event, ev.outcome, a.certificate, a.subject,
                    a.address, a.protocol, ev.topic, ev.subscription, ev.message_id, ev.key_id,
                    ev.trace_id, msgspec.Raw(detail), ids, traces,
                ),
            )  # fmt: skip
            out.append(
                (
                    chain, seq, at, ev.event, ev.outcome, a.certificate, a.subject, a.address,
                    a.protocol, ev.topic, ev.subscription, ev.message_id, ev.key_id, ev.trace_id,
                    detail.decode() if ev.detail else None, prev, h, ids, traces,
                )
            )  # fmt: skip
            prev = h
        return out

    def advance(self, staged: Sequence[Row]) -> None:
        last = staged[-1]
        self.seq, self.head, self.head_at = last[1], last[16], last[2]
        self.head_at_us = to_us(last[2])


#: a staged record: the columns of ``sb_audit`` in ``COLUMNS`` order
Row = tuple[Any, ...]
COLUMNS = (
    "chain", "seq", "at", "event", "outcome", "actor_cert", "actor_sub", "origin_addr",
    "origin_proto", "topic", "subscription", "message_id", "key_id", "trace_id", "detail",
    "prev_hash", "hash", "message_ids", "trace_ids",
)  # fmt: skip


def record_of(row: asyncpg.Record) -> AuditRecord:
    ids = row["message_ids"]
    return AuditRecord(
        chain=row["chain"],
        seq=row["seq"],
        at_us=to_us(row["at"]),
        event=row["event"],
        outcome=row["outcome"],
        actor_cert=row["actor_cert"],
        actor_sub=row["actor_sub"],
        origin_addr=row["origin_addr"],
        origin_proto=row["origin_proto"],
        topic=row["topic"],
        subscription=row["subscription"],
        message_id=None if row["message_id"] is None else str(row["message_id"]),
        key_id=row["key_id"],
        trace_id=row["trace_id"],
        detail=_detail(row["detail"]),
        prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]),
        message_ids=None if ids is None else tuple(str(x) for x in ids),
        trace_ids=None if ids is None else tuple(row["trace_ids"] or ()),
    )


def _detail(value: str | None) -> dict[str, Any]:
    """A record's ``detail`` as stored: canonical JSON text, or NULL for none."""
    if value is None:
        return {}
    decoded: dict[str, Any] = msgspec.json.decode(value)
    return decoded


class AuditLog:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        signer: SigningKey | None,
        clock: Clock | None = None,
        instance: str | None = None,
        checkpoint_interval: float = 60.0,
    ) -> None:
        self.pool = pool
        self.signer = signer
        self.clock = clock or SystemClock()
        self.instance = instance or instance_name()
        self.checkpoint_interval = checkpoint_interval
        self._free: list[Lane] = []
        #: chains of the lanes checked out right now
        self._busy: set[int] = set()
        self._checkpointing = asyncio.Lock()
        self._lanes: dict[int, Lane] = {}
        self._queue: list[AuditEvent] = []
        self._dropped = 0
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._n = 0
        self._prev: bytes | None = None
        self._signed: tuple[tuple[int, int], ...] = ()
        self.checkpoints_written = 0
        #: the server's crash marker when last read (``check_server``), and the backends
        #: (server pids) already checked against it
        self._epoch: uuid.UUID | None = None
        self._checked: set[int] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Register the signing key's public half, make sure this month's and the next
        month's partitions exist, and start the writer and the checkpointer."""
        async with self.pool.acquire() as conn:
            await self.check_server(conn)
            if self.signer is not None:
                await conn.execute(
                    Q["audit_key_register"], self.signer.key_id, self.signer.public_bytes()
                )
            try:
                await self.ensure_partitions(conn)
            except asyncpg.PostgresError as exc:  # records then go to the default partition
                log.warning("audit partitions not created: %s", exc.__class__.__name__)
        self._tasks = [
            asyncio.ensure_future(self._write_loop()),
            asyncio.ensure_future(self._checkpoint_loop()),
        ]

    async def ensure_partitions(self, conn: Any) -> None:
        month = self.clock.now().date().replace(day=1)
        for _ in range(3):  # this month and the next two, so a long outage still finds them
            await conn.fetchval(Q["audit_ensure_partition"], month)
            month = date(month.year + month.month // 12, month.month % 12 + 1, 1)

    async def close(self) -> None:
        """Write what is queued, sign a final checkpoint, stop."""
        self._stop.set()
        self._wake.set()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        try:
            await self._flush()
            await self.checkpoint(final=True)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.error("final audit checkpoint failed: %s", exc.__class__.__name__)  # noqa: TRY400

    # -- lanes ----------------------------------------------------------------------------------
    async def checkout(self) -> Lane:
        if self._free:
            lane = self._free.pop()
        else:
            chain = int(await self.pool.fetchval(Q["audit_chain_create"], self.instance))
            lane = Lane(chain, 0, genesis(chain), 0)
            self._lanes[chain] = lane
        self._busy.add(lane.chain)
        return lane

    def checkin(self, lane: Lane, staged: Sequence[Row], outcome: Outcome) -> None:
        self._busy.discard(lane.chain)
        if outcome == "unknown" and staged:
            self._retire(lane)  # see the module docstring
        elif outcome == "committed" and staged and not lane.retired:
            lane.advance(staged)
        if not lane.retired:
            self._free.append(lane)

    def _retire(self, lane: Lane) -> None:
        if not lane.retired:
            lane.retired = lane.suspect = True

    def connection_lost(self) -> None:
        """The database connection failed: retire every lane. A lease commits asynchronously
        (``synchronous_commit = off``); if the server crashed, its last records may be gone
        although the lanes moved past them, and a new record must not link to a lost one. New
        lanes start new chains; the retired ones' heads are read back once the server is up."""
        for lane in self._lanes.values():
            self._retire(lane)
        self._free.clear()
        self._checked.clear()

    async def check_server(self, conn: Any) -> None:
        """Before a transaction on ``conn``: if the server crashed since this log last looked,
        retire every lane and refuse the transaction (retryable).

        A broker between transactions when the server crashed sees no connection error: its
        pool reconnects silently. The crash is told by ``sb_server_epoch`` (migration 0007), an
        unlogged table that crash recovery empties and a clean shutdown keeps, read once per
        new backend (a new server pid), so an established connection costs nothing."""
        pid = conn.get_server_pid()
        if pid in self._checked:
            return
        epoch = await conn.fetchval(Q["audit_epoch"])
        if self._epoch is not None and epoch != self._epoch:
            log.warning("the database server crashed since the last transaction: new chains")
            self.connection_lost()
            self._epoch = epoch
            raise Unavailable("the database server restarted; retry")
        self._epoch = epoch
        self._checked.add(pid)

    async def _settle_suspects(self) -> None:
        """Read back the final heads of retired lanes (their COMMIT has been decided). A lane
        still in a transaction is read when that transaction is over."""
        for lane in [x for x in self._lanes.values() if x.suspect and x.chain not in self._busy]:
            row = await self.pool.fetchrow(Q["audit_chain_head"], lane.chain)
            if row is not None:
                lane.seq, lane.head, lane.head_at = row["seq"], bytes(row["hash"]), row["at"]
                lane.head_at_us = to_us(row["at"])
            lane.suspect = False

    @contextlib.asynccontextmanager
    async def transaction(
        self, pool: asyncpg.Pool | None = None
    ) -> AsyncIterator[tuple[Any, list[AuditEvent]]]:
        """A database transaction whose audit events (appended by the caller to the yielded
        list) are chained and inserted just before COMMIT."""
        events: list[AuditEvent] = []
        lane = await self.checkout()
        staged: list[Row] = []
        outcome: Outcome = "rolled_back"
        try:
            async with (pool or self.pool).acquire() as conn:
                await self.check_server(conn)
                async with conn.transaction():
                    yield conn, events
                    if events:
                        staged = lane.stage(events)
                        # COPY: the cheapest insert for both sides (asyncpg encodes rows in
                        # binary; the server skips the planner and unnest)
                        await conn.copy_records_to_table(
                            "sb_audit", records=staged, columns=COLUMNS
                        )
                    outcome = "unknown"  # from here on a failure is in COMMIT
                outcome = "committed"
        except CONNECTION_ERRORS:
            self.connection_lost()
            raise
        finally:
            self.checkin(lane, staged, outcome)

    def heads(self) -> list[Head]:
        return [
            Head(chain=lane.chain, seq=lane.seq, hash=lane.head, at_us=lane.head_at_us)
            for lane in sorted(self._lanes.values(), key=lambda x: x.chain)
            if lane.seq > 0 and not lane.suspect and not lane.done
        ]

    # -- events without a transaction of their own ----------------------------------------------
    def record(self, events: Iterable[AuditEvent]) -> None:
        """Queue events that record something outside a store transaction (refused
        connections, denials, rejected publishes, policy reloads). Written in batches by a
        background task; beyond ``QUEUE_LIMIT`` they are counted and a summary record says how
        many were not written, so a flood cannot exhaust memory or go unnoticed."""
        for ev in events:
            if len(self._queue) >= QUEUE_LIMIT:
                self._dropped += 1
            else:
                self._queue.append(ev)
        self._wake.set()

    async def flush(self) -> None:
        """Write the queued events now."""
        await self._flush()

    async def _write_loop(self) -> None:
        while not self._stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("audit write failed, will retry: %s", exc.__class__.__name__)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._stop.wait()
                self._wake.set()

    async def _flush(self) -> None:
        # one writer at a time, so ``flush`` returns only after a batch the background writer
        # already took has been written too
        async with self._flushing:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        while self._queue or self._dropped:
            batch, self._queue = self._queue[:1000], self._queue[1000:]
            if self._dropped:
                from securebroker.audit.events import suppressed  # noqa: PLC0415

                batch.append(suppressed(self.clock.now(), self._dropped))
                dropped, self._dropped = self._dropped, 0
            else:
                dropped = 0
            try:
                async with self.transaction() as (_, events):
                    events.extend(batch)
            except asyncpg.PostgresError as exc:
                if isinstance(exc, asyncpg.PostgresConnectionError):
                    self._requeue(batch, dropped)
                    raise
                # the database refused these records (it would again): count them as not
                # kept, in the next summary record, instead of retrying them forever
                log.error("audit records refused by the database: %s", exc.__class__.__name__)  # noqa: TRY400
                self._dropped += dropped + sum(1 for e in batch if e.event != "audit_suppressed")
                return  # the summary goes out with the next batch (no busy loop meanwhile)
            except BaseException:
                self._requeue(batch, dropped)
                raise

    def _requeue(self, batch: list[AuditEvent], dropped: int) -> None:
        self._queue[:0] = [e for e in batch if e.event != "audit_suppressed"]
        self._dropped += dropped

    # -- checkpoints ----------------------------------------------------------------------------
    async def _checkpoint_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.checkpoint_interval):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await self.checkpoint()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("audit checkpoint failed, will retry: %s", exc.__class__.__name__)
            try:
                async with self.pool.acquire() as conn:
                    await self.ensure_partitions(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("audit partitions not created: %s", exc.__class__.__name__)

    async def checkpoint(self, *, final: bool = False) -> Checkpoint | None:
        """Sign the heads of this process's chains, if any moved since the last signature (or
        ``final``, at shutdown). Without a signing key nothing is signed (tests only: ``serve``
        requires one)."""
        if self.signer is None:
            return None
        async with self._checkpointing:  # the periodic one and an auditor's export may meet
            # a crash of the server since the last transaction: never sign a head it may have
            # lost (check_server retires the lanes; their heads are read back just below)
            with contextlib.suppress(Unavailable):
                async with self.pool.acquire() as conn:
                    await self.check_server(conn)
            await self._settle_suspects()
            heads = self.heads()
            state = tuple((h.chain, h.seq) for h in heads)
            if not heads or (state == self._signed and not final):
                return None
            try:
                cp = await self._sign(heads, final)
            except asyncpg.UniqueViolationError:
                # an earlier insert committed but its reply was lost: continue after it
                await self._resume_numbering()
                cp = await self._sign(heads, final)
            self._signed = state
            for lane in [x for x in self._lanes.values() if x.retired and not x.suspect]:
                lane.done = True  # its final head is signed now
                del self._lanes[lane.chain]
            self.checkpoints_written += 1
            return cp

    async def _sign(self, heads: list[Head], final: bool) -> Checkpoint:
        assert self.signer is not None
        now = self.clock.now()
        cp = self.signer.sign_checkpoint(
            instance=self.instance,
            n=self._n + 1,
            prev=self._prev,
            at_us=to_us(now),
            final=final,
            heads=tuple(heads),
        )
        await self.pool.execute(
            Q["audit_checkpoint_insert"],
            self.instance,
            cp.n,
            now,
            cp.body,
            cp.signature,
            cp.key_id,
        )
        self._n, self._prev = cp.n, cp.digest()
        return cp

    async def _resume_numbering(self) -> None:
        row = await self.pool.fetchrow(Q["audit_checkpoint_last"], self.instance)
        if row is not None:
            self._n, self._prev = row["n"], hashlib.sha256(bytes(row["body"])).digest()

    # -- reading (auditor operations) -----------------------------------------------------------
    async def trail(self, message_id: uuid.UUID, limit: int = 10_000) -> list[AuditRecord]:
        rows = await self.pool.fetch(Q["audit_trail"], message_id, limit)
        return [record_of(r) for r in rows]

    async def search(
        self,
        since: datetime,
        until: datetime,
        *,
        actor: str | None,
        topic: str | None,
        event: str | None,
        after: tuple[datetime, int, int] | None,
        limit: int,
    ) -> list[AuditRecord]:
        cursor = after or (since, 0, 0)
        rows = await self.pool.fetch(
            Q["audit_search"], since, until, actor, topic, event, *cursor, limit
        )
        return [record_of(r) for r in rows]

    async def export_page(
        self, since: datetime, until: datetime, after: tuple[int, int], limit: int
    ) -> list[AuditRecord]:
        rows = await self.pool.fetch(Q["audit_export"], since, until, after[0], after[1], limit)
        return [record_of(r) for r in rows]

    async def checkpoints(self, since: datetime, until: datetime) -> list[Checkpoint]:
        rows = await self.pool.fetch(Q["audit_checkpoints"], since, until)
        return [
            Checkpoint.parse(bytes(r["body"]), bytes(r["signature"]), r["key_id"]) for r in rows
        ]

    async def anchors(self, since: datetime, until: datetime) -> list[tuple[int, int, bytes]]:
        """(chain, seq, hash) of each chain's last record before ``since``, for chains with
        records in the window."""
        rows = await self.pool.fetch(Q["audit_anchors"], since, until)
        return [(r["chain"], r["seq"], bytes(r["hash"])) for r in rows]

    async def horizon(self) -> datetime | None:
        """Where the kept log starts: after the newest month pruned by retention, if any."""
        month = await self.pool.fetchval(Q["audit_horizon"])
        return None if month is None else datetime(month.year, month.month, 1, tzinfo=UTC)

    async def public_keys(self) -> list[tuple[str, bytes]]:
        rows = await self.pool.fetch(Q["audit_keys"])
        return [(r["key_id"], bytes(r["public_key"])) for r in rows]
