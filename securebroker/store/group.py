"""Group commit: many publishes and acks from many connections share one transaction.

PostgreSQL's cost per commit (a WAL flush) caps one-message-per-transaction brokers at a few
thousand messages per second. ``GroupCommitStore`` queues ``publish`` and ``ack`` calls and a few
committer tasks drain the queue: each takes whatever is waiting (up to a bound), runs it as one
transaction, and only then resolves every caller's future. Under light load a call goes straight
through (no added delay); under heavy load batches grow by themselves while the previous commit
is in flight ("natural batching").

The contract is unchanged (DESIGN §3): a confirm still means "committed"; each request keeps its
own atomicity. If a shared transaction fails (an idempotency conflict in one request, say), the
group is retried one request per transaction, so one bad request never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import asyncpg

from securebroker.core.model import PreparedMessage, PublishResult, SettleRef
from securebroker.errors import BrokerError, Unavailable
from securebroker.store.postgres import DB_ERRORS, PostgresStore, create_pools

log = logging.getLogger("securebroker.groupcommit")

R = TypeVar("R")


@dataclass
class _Job(Generic[R]):
    items: Sequence[object]
    future: asyncio.Future[list[R]]
    now: datetime | None = None


@dataclass
class GroupStats:
    transactions: int = 0
    requests: int = 0
    fallbacks: int = 0
    largest: int = 0
    #: groups committed by ``publish_group`` (one statement), and by the general path
    single_statement: int = 0
    general: int = 0
    #: ack groups committed by ``ack_group`` (one statement)
    single_statement_acks: int = 0
    sizes: list[int] = field(default_factory=list)


class GroupCommitStore(PostgresStore):
    def __init__(
        self,
        pool: asyncpg.Pool,
        lease_pool: asyncpg.Pool | None = None,
        *,
        committers: int = 3,
        max_items: int = 4000,
        retention: timedelta = timedelta(days=7),
    ) -> None:
        super().__init__(pool, lease_pool)
        self._publishes: asyncio.Queue[_Job[PublishResult]] = asyncio.Queue()
        self._acks: asyncio.Queue[_Job[BrokerError | None]] = asyncio.Queue()
        self._max_items = max_items
        self._committers = committers
        self._tasks: list[asyncio.Task[None]] = []
        self._retention = retention
        self.stats = GroupStats()
        #: the running loop, looked up once: ``asyncio.get_running_loop()`` costs a ``getpid``
        #: system call per call (4% of the broker's CPU on the publish path)
        self._loop: asyncio.AbstractEventLoop | None = None
        #: called after a committer takes a group (observability and tests)
        self.on_take: Callable[[GroupStats], None] = lambda stats: None

    @classmethod
    async def connect_group(
        cls, dsn: str, *, min_size: int = 2, max_size: int = 10, committers: int = 3
    ) -> GroupCommitStore:
        pool, lease_pool = await create_pools(dsn, min_size=min_size, max_size=max_size)
        store = cls(pool, lease_pool, committers=committers)
        store.start()
        return store

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for _ in range(self._committers):
            self._tasks.append(asyncio.ensure_future(self._run_publishes()))
        self._tasks.append(asyncio.ensure_future(self._run_acks()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for q in (self._publishes, self._acks):
            while not q.empty():
                job = q.get_nowait()
                if not job.future.done():
                    job.future.set_exception(Unavailable("broker is shutting down"))
        await super().close()

    # -- the port methods that are grouped ------------------------------------------------------
    async def publish(
        self, messages: Sequence[PreparedMessage], retention: timedelta
    ) -> list[PublishResult]:
        return await self.submit_publish(messages, retention)

    def submit_publish(
        self, messages: Sequence[PreparedMessage], retention: timedelta
    ) -> asyncio.Future[list[PublishResult]]:
        """Queue for the next group; the future resolves after that group's commit."""
        self._retention = retention
        fut: asyncio.Future[list[PublishResult]] = self._future()
        self._publishes.put_nowait(_Job(messages, fut))
        return fut

    async def ack(self, refs: Sequence[SettleRef], now: datetime) -> list[BrokerError | None]:
        fut: asyncio.Future[list[BrokerError | None]] = self._future()
        self._acks.put_nowait(_Job(refs, fut, now))
        return await fut

    def _future(self) -> asyncio.Future[Any]:
        loop = self._loop or asyncio.get_running_loop()
        return loop.create_future()

    # -- committers ------------------------------------------------------------------------------
    async def _take(self, queue: asyncio.Queue[_Job[R]]) -> list[_Job[R]]:
        first = await queue.get()
        jobs = [first]
        count = len(first.items)
        while count < self._max_items and not queue.empty():
            job = queue.get_nowait()
            jobs.append(job)
            count += len(job.items)
        self.stats.transactions += 1
        self.stats.requests += len(jobs)
        self.stats.largest = max(self.stats.largest, count)
        self.on_take(self.stats)
        return jobs

    async def _run_publishes(self) -> None:
        await self._commit_groups(self._publishes, self._publish_group_jobs, "group publish")

    async def _run_acks(self) -> None:
        await self._commit_groups(self._acks, self._ack_group_jobs, "ack")

    async def _commit_groups(
        self,
        queue: asyncio.Queue[_Job[R]],
        commit: Callable[[list[_Job[R]]], Awaitable[None]],
        what: str,
    ) -> None:
        """A committer: take a group, commit it, forever. Failures that end a group are
        decided here, once for every path: a database error (the outcome may be unknown: a
        connection lost during COMMIT) fails every request unconfirmed and is never retried
        here, where an unkeyed message could be stored twice; clients retry with the same
        idempotency key. An unexpected error (a bug) does the same, and the committer lives
        on: a dead one would leave every later request waiting forever."""
        while True:
            jobs = await self._take(queue)
            try:
                await commit(jobs)
            except asyncio.CancelledError:
                _fail(jobs, Unavailable("broker is shutting down"))
                raise
            except DB_ERRORS as exc:
                _db_failed(what, jobs, exc)
            except Exception:
                log.exception("%s failed unexpectedly", what)
                _fail(jobs, Unavailable("internal error; retry with the same idempotency key"))

    async def _publish_group_jobs(self, jobs: list[_Job[PublishResult]]) -> None:
        flat: list[PreparedMessage] = [m for j in jobs for m in j.items]  # type: ignore[misc]
        try:
            # fresh messages (the usual case): one statement, one round trip
            fast = await self.publish_group(flat)
        except BrokerError:
            fast = None  # a missing topic, say: the general path isolates the culprit
        if fast is not None:
            self.stats.single_statement += 1
            _resolve(jobs, fast)
            return
        self.stats.general += 1
        if len(jobs) == 1:
            await self._publish_one(jobs[0])
            return
        try:
            async with self._tx() as (conn, events):
                results = await self.publish_in(conn, flat, self._retention, events)
        except BrokerError:
            # Raised by our own checks (an idempotency conflict, a missing topic) before
            # COMMIT, so the shared transaction certainly rolled back: isolate the culprit by
            # retrying each request in its own transaction.
            self.stats.fallbacks += 1
            for job in jobs:
                await self._publish_one(job)
            return
        _resolve(jobs, results)

    async def _publish_one(self, job: _Job[PublishResult]) -> None:
        try:
            async with self._tx() as (conn, events):
                result = await self.publish_in(conn, job.items, self._retention, events)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            _fail([job], Unavailable("broker is shutting down"))
            raise
        except BrokerError as exc:
            self.audit_rejected(job.items, exc)  # type: ignore[arg-type]
            _fail([job], exc)
        except DB_ERRORS as exc:
            _db_failed("publish", [job], exc)
        else:
            if not job.future.done():
                job.future.set_result(result)

    async def _ack_group_jobs(self, jobs: list[_Job[BrokerError | None]]) -> None:
        flat: list[SettleRef] = [r for j in jobs for r in j.items]  # type: ignore[misc]
        now = jobs[-1].now
        assert now is not None
        # acks that all hold their leases (the usual case): one statement
        results = await self.ack_group(flat, now)
        if results is not None:
            self.stats.single_statement_acks += 1
        else:
            async with self._tx() as (conn, events):
                results = await self.ack_in(conn, flat, now, events)
        _resolve(jobs, results)


def _resolve(jobs: Sequence[_Job[R]], results: Sequence[R]) -> None:
    """Hand each job its slice of a group's results, in queue order."""
    pos = 0
    for job in jobs:
        n = len(job.items)
        if not job.future.done():
            job.future.set_result(list(results[pos : pos + n]))
        pos += n


def _db_failed(what: str, jobs: Sequence[_Job[R]], exc: BaseException) -> None:
    """A database failure: every job in the group fails unconfirmed, as retryable."""
    log.warning("%s failed: %s", what, exc.__class__.__name__)
    _fail(jobs, Unavailable(f"database error: {exc.__class__.__name__}"))


def _fail(jobs: Sequence[_Job[R]], exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)
