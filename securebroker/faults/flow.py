"""The payment flow the fault harness runs, end to end through real processes and connections.

    order service ──(own DB: order row + outbox row, one transaction)
        └─ outbox relay ──publish, confirm──▶ broker ▶ payments.requested
                                                  └─ payment service (inbox, own DB: ledger debit)
                                                       └─ atomic settle: ack input + publish
                                                          payments.completed, one broker tx
                                                  ▶ payments.completed
                                                  └─ ledger consumer (inbox, own DB: completion)

Who runs where (who owns what at run time):

- the **order service** is a task in the harness process (``OrderService``); it only touches the
  orders database, so the broker being down never stops it: its outbox fills up instead;
- the **outbox relay**, the **payment service** and the **ledger consumer** are separate worker
  processes (``python -m securebroker.faults.flow SPEC.json``), each with its own broker
  connection (mutual TLS, its own certificate and bound token) and its own connection pool to
  its own database. The harness SIGKILLs them mid-batch and starts them again.

Each worker reports what it does as one line per event on stdout, ``KIND MONOTONIC FIELD...``
(``time.monotonic()`` is the machine-wide CLOCK_MONOTONIC on Linux, so the harness compares it
with its own clock to measure recovery):

    ready T                         connected to the broker and its database, working
    confirmed T N DUPLICATES        (relay) a publish of N outbox rows was confirmed
    delivered T ORDER ATTEMPT       (consumers) a delivery arrived
    handled T ORDER                 (consumers) the handler ran, inside the DB transaction
    settling T ORDER                (consumers) committed; the atomic settle is being sent
    processed T ORDER               (consumers) processed once: committed and settled
    redelivery T ORDER              (consumers) the inbox recognised an already processed message
    unsettled T ORDER               (consumers) the lease ran out before the settle
    failed T WHAT DETAIL            a transient failure (broker or database away); retried later
    error T WHAT DETAIL             anything else: a bug (the harness reports it as an anomaly)

The effects each stage leaves in its own database are what the checker counts: there are no
unique constraints on the effect tables on purpose, so a second effect would show as a second
row rather than as an error hiding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import LiteralString

import asyncpg

from securebroker.client import Client, Message, OutgoingMessage
from securebroker.core.model import PublishResult, SettleOutcome
from securebroker.errors import AuthenticationError, BrokerError, Unavailable
from securebroker.faults.checker import Observations, StageObservation
from securebroker.inbox import Conn, Handler, Inbox
from securebroker.inbox import install as install_inbox
from securebroker.outbox import OutboxRelay, enqueue
from securebroker.outbox import install as install_outbox
from securebroker.store.sql import parse
from securebroker.tls import client_context

log = logging.getLogger("securebroker.faults.flow")

REQUESTED = "payments.requested"
COMPLETED = "payments.completed"
PAYMENT_SUBSCRIPTION = "payments.requested.payment-service"
LEDGER_SUBSCRIPTION = "payments.completed.ledger"

#: stage names in reports and checker verdicts
DEBIT_STAGE = "payment.ledger_debit"
COMPLETION_STAGE = "ledger.completion"

#: worker roles, in the order the harness starts them; each has its own identity and database
ROLES = ("relay", "payment", "ledger")
IDENTITIES = {
    "relay": "order-relay",
    "payment": "payment-service",
    "ledger": "ledger-service",
}

#: what a transient failure in a worker looks like: the broker or a database went away
TRANSIENT: tuple[type[BaseException], ...] = (
    BrokerError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # asyncpg's "connection in a broken state" after the server cut it mid-operation
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)

#: the flow's SQL, parsed once (``flow.sql``)
Q: dict[str, LiteralString] = parse(
    resources.files(__package__).joinpath("flow.sql").read_text(encoding="utf-8")
)


def emit(kind: str, *fields: object) -> None:
    """One event line on stdout (the harness reads it); flushed at once."""
    line = " ".join([kind, f"{time.monotonic():.6f}", *(str(f) for f in fields)])
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def order_payload(order_id: str, amount_cents: int) -> bytes:
    return json.dumps({"order_id": order_id, "amount_cents": amount_cents}).encode()


def order_number(order_id: str) -> int:
    """The sequence number an order id ends in (``o7-0000042`` -> 42); -1 if none."""
    tail = order_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def order_of(message: Message) -> str:
    """The business id a message is about (a cleartext attribute: never secret)."""
    return message.attributes.get("order_id", "?")


# -- databases -------------------------------------------------------------------------------
async def install_schemas(orders_dsn: str, payments_dsn: str, ledger_dsn: str) -> None:
    """The three services' own tables, the outbox and the two inboxes."""

    conn = await asyncpg.connect(orders_dsn)
    try:
        await conn.execute(Q["orders_schema"])
        await install_outbox(conn)
    finally:
        await conn.close()
    for dsn, schema in ((payments_dsn, Q["payments_schema"]), (ledger_dsn, Q["ledger_schema"])):
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(schema)
            await install_inbox(conn)
        finally:
            await conn.close()


# -- the order service (a task in the harness process) ----------------------------------------
@dataclass
class OrderStats:
    attempted: int = 0
    #: transactions whose COMMIT returned (a failed COMMIT has an unknown outcome: the orders
    #: table, not this count, is what the checker takes as confirmed)
    committed: int = 0
    rolled_back: int = 0
    failed: int = 0


class OrderService:
    """Writes orders at a steady pace, each with its outbox row in one transaction.

    A seeded share of the transactions is rolled back on purpose after enqueueing: those orders
    were never confirmed, so any effect of theirs would be ``unexpected``. Pacing is load
    shaping, not synchronisation: the harness waits on events, never on this clock.
    """

    def __init__(
        self,
        dsn: str,
        rng: random.Random,
        *,
        prefix: str,
        rate: float,
        rollback_share: float = 0.05,
    ) -> None:
        self.dsn = dsn
        self.rng = rng
        self.prefix = prefix
        self.rate = rate
        self.rollback_share = rollback_share
        self.stats = OrderStats()
        self._next = 0

    @property
    def placed(self) -> int:
        """The number of the last order attempted (order ids end in it)."""
        return self._next

    async def run(self, stop: asyncio.Event) -> None:
        pool = await _pool_retrying(self.dsn, stop)
        if pool is None:
            return
        tick = 0.05
        try:
            while not stop.is_set():
                for _ in range(_per_tick(self.rng, self.rate * tick)):
                    await self._one(pool)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(tick):
                        await stop.wait()
        finally:
            await pool.close()

    async def _one(self, pool: asyncpg.Pool) -> None:
        self._next += 1
        order_id = f"{self.prefix}-{self._next:07d}"
        amount = self.rng.randrange(100, 100_000)
        abort = self.rng.random() < self.rollback_share
        self.stats.attempted += 1
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(Q["order_insert"], order_id, amount)
                await enqueue(
                    conn,
                    REQUESTED,
                    order_payload(order_id, amount),
                    key=order_id,
                    attributes={"order_id": order_id},
                )
                if abort:
                    raise _Rollback
        except _Rollback:
            self.stats.rolled_back += 1
            return
        except TRANSIENT as exc:  # the database restarting: this order's outcome is unknown
            self.stats.failed += 1
            log.debug("order %s failed: %s", order_id, exc)
            return
        self.stats.committed += 1


class _Rollback(Exception):
    """Raised inside an order transaction to roll it back on purpose."""


def _per_tick(rng: random.Random, mean: float) -> int:
    whole = int(mean)
    return whole + (1 if rng.random() < mean - whole else 0)


async def _pool_retrying(
    dsn: str, stop: asyncio.Event, *, min_size: int = 1, max_size: int = 4
) -> asyncpg.Pool | None:
    """A pool, retrying while the database is (re)starting; None if stopped first."""
    delay = 0.05
    while not stop.is_set():
        try:
            return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
        except TRANSIENT as exc:
            log.debug("database not ready: %s", exc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        delay = min(delay * 2, 1.0)
    return None


# -- observations for the checker -------------------------------------------------------------
@dataclass(frozen=True)
class FlowDatabases:
    broker: str
    orders: str
    payments: str
    ledger: str


async def _column(dsn: str, query: LiteralString, *args: object) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def held_by_broker(broker_dsn: str, subscription: str) -> tuple[list[str], list[str]]:
    """Order ids of the deliveries a subscription still holds: (live, dead-lettered)."""
    conn = await asyncpg.connect(broker_dsn)
    try:
        rows = await conn.fetch(Q["held_by_broker"], subscription)
    finally:
        await conn.close()
    live = [r["order_id"] or "?" for r in rows if r["state"] != 2]
    dead = [r["order_id"] or "?" for r in rows if r["state"] == 2]
    return live, dead


#: per effect table: one row per inbox row with redeliveries, with its order id
_REDELIVERIES = {
    "fault_ledger_debits": Q["redeliveries_debits"],
    "fault_completions": Q["redeliveries_completions"],
}


async def recorded_redeliveries(dsn: str, inbox: str, effects: str) -> list[str]:
    """One order id per redelivery an inbox recorded (``sb_inbox.redeliveries``: deliveries of
    a message it had already taken effect on, not acted on again). The order is found through
    the effect row written with the message id; a redelivery of a message without one (which
    the checker then reports as lost anyway) is listed under the message id."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_REDELIVERIES[effects], inbox)
    finally:
        await conn.close()
    return [r["order_id"] for r in rows for _ in range(r["redeliveries"])]


async def unsent_outbox(orders_dsn: str) -> list[str]:
    """Keys (order ids) of outbox rows the relay has not yet had confirmed."""
    return await _column(orders_dsn, Q["unsent_outbox"])


@dataclass(frozen=True)
class Collected:
    observations: Observations
    dead_letters: list[str]


async def collect(dbs: FlowDatabases) -> Collected:
    """What every party's own database says, for the checker."""
    confirmed = await _column(dbs.orders, Q["confirmed_orders"])
    outbox = await unsent_outbox(dbs.orders)
    requested_live, requested_dead = await held_by_broker(dbs.broker, PAYMENT_SUBSCRIPTION)
    completed_live, completed_dead = await held_by_broker(dbs.broker, LEDGER_SUBSCRIPTION)
    debit_held = {*outbox, *requested_live, *requested_dead}
    stages = [
        StageObservation(
            DEBIT_STAGE,
            effects=await _column(dbs.payments, Q["debit_orders"]),
            redeliveries=await recorded_redeliveries(
                dbs.payments, "payment", "fault_ledger_debits"
            ),
            held=debit_held,
        ),
        StageObservation(
            COMPLETION_STAGE,
            effects=await _column(dbs.ledger, Q["completion_orders"]),
            redeliveries=await recorded_redeliveries(dbs.ledger, "ledger", "fault_completions"),
            held=debit_held | {*completed_live, *completed_dead},
        ),
    ]
    return Collected(Observations(confirmed, stages), [*requested_dead, *completed_dead])


async def completed_count(
    orders: asyncpg.Connection, ledger: asyncpg.Connection
) -> tuple[int, int]:
    """(orders confirmed, orders with a completion), on connections to the orders and the
    ledger databases: the harness's drain condition."""
    confirmed: int = await orders.fetchval(Q["count_orders"])
    done: int = await ledger.fetchval(Q["count_completed"])
    return confirmed, done


# -- worker processes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is told (a JSON file written by the harness)."""

    role: str
    host: str
    port: int
    ca: str
    cert: str
    key: str
    token: str | None
    dsn: str
    subscription: str = ""
    credit: int = 32
    concurrency: int = 8
    retry_for: float = 120.0

    def dump(self, path: Path) -> Path:
        path.write_text(json.dumps(self.__dict__), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> WorkerSpec:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


class ObservedClient(Client):
    """The SDK client, reporting each confirmed publish (the relay's confirms) as an event."""

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> list[PublishResult]:
        results = await super().publish_batch(messages)
        emit("confirmed", len(results), sum(r.duplicate for r in results))
        return results


async def open_client(spec: WorkerSpec, stop: asyncio.Event) -> Client | None:
    """Connect, retrying while the broker is down or restarting; None if stopped first.

    ``connect()`` never retries the first connection (a refusal must surface), but a worker
    (re)started while the broker is being killed has to wait for it.
    """
    ctx = client_context(cert=Path(spec.cert), key=Path(spec.key), ca=Path(spec.ca))
    delay = 0.05
    while not stop.is_set():
        client = ObservedClient(
            spec.host,
            spec.port,
            ctx,
            server_hostname=None,
            token=spec.token,
            reconnect=True,
            connect_timeout=5.0,
            retry_for=spec.retry_for,
        )
        try:
            await client.start()
        except (Unavailable, AuthenticationError) as exc:
            # A broker killed mid-handshake looks like a refusal; the harness's deadline bounds
            # how long a real refusal would be retried.
            log.debug("broker not ready: %s", exc)
            await client.close()
        else:
            return client
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        delay = min(delay * 2, 1.0)
    return None


async def run_relay(
    spec: WorkerSpec, client: Client, pool: asyncpg.Pool, stop: asyncio.Event
) -> None:
    # retries capped at 5 s (default 60 s): the broker is down for seconds at a time here
    relay = OutboxRelay(pool, client, backoff_base=0.2, backoff_max=5.0)
    emit("ready")
    delay = 0.05
    while not stop.is_set():
        try:
            await relay.run(stop)
        except TRANSIENT as exc:
            emit("failed", "relay", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            delay = min(delay * 2, 1.0)
        else:
            delay = 0.05


async def debit(conn: Conn, message: Message) -> list[OutgoingMessage] | None:
    """The payment service's handler: one ledger debit, and the completion to publish."""
    order = json.loads(message.payload)
    emit("handled", order["order_id"])
    await conn.execute(
        Q["debit_insert"],
        order["order_id"],
        order["amount_cents"],
        message.id,
    )
    return [
        OutgoingMessage(
            COMPLETED,
            json.dumps({"order_id": order["order_id"], "payment": str(message.id)}).encode(),
            attributes={"order_id": order["order_id"]},
            content_type="application/json",
            idempotency_key=f"completed:{order['order_id']}",
        )
    ]


async def complete(conn: Conn, message: Message) -> list[OutgoingMessage] | None:
    """The ledger consumer's handler: record the completion."""
    done = json.loads(message.payload)
    emit("handled", done["order_id"])
    await conn.execute(
        Q["completion_insert"],
        done["order_id"],
        message.id,
    )
    return None


async def run_consumer(
    spec: WorkerSpec, client: Client, pool: asyncpg.Pool, stop: asyncio.Event, handler: Handler
) -> None:
    inbox = Inbox(pool, name=spec.role)
    subscription = client.consume(spec.subscription, credit=spec.credit)
    slots = asyncio.Semaphore(spec.concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(message: Message) -> None:
        order_id = order_of(message)
        settle = message.settle

        async def settling(
            publish: Sequence[OutgoingMessage] = (), *, settle_id: str | None = None
        ) -> SettleOutcome:
            # the inbox settles only after the consumer's transaction committed: this is the
            # moment a crash leaves an effect whose message comes back (a redelivery)
            emit("settling", order_id)
            return await settle(publish, settle_id=settle_id)

        setattr(message, "settle", settling)  # noqa: B010 - instrumentation of this delivery
        try:
            result = await inbox.process(message, handler)
        except TRANSIENT as exc:  # not settled: the lease expires and it comes again
            emit("failed", order_id, type(exc).__name__)
            return
        except Exception as exc:  # a bug: reported to the harness (an anomaly), not hidden
            emit("error", order_id, type(exc).__name__)
            raise
        finally:
            slots.release()
        if not result.settled:  # the lease ran out first: the redelivery settles it
            emit("unsettled", order_id)
        else:
            emit("processed" if result.processed else "redelivery", order_id)

    async def pump() -> None:
        emit("ready")
        async for message in subscription:
            emit("delivered", order_of(message), message.attempt)
            await slots.acquire()
            task = asyncio.ensure_future(one(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    pumping = asyncio.ensure_future(pump())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({pumping, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        await subscription.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if not pumping.done():
            pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping


async def worker_main(spec: WorkerSpec) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = await _pool_retrying(spec.dsn, stop, max_size=spec.concurrency + 2)
    if pool is None:
        return
    try:
        client = await open_client(spec, stop)
        if client is None:
            return
        try:
            if spec.role == "relay":
                await run_relay(spec, client, pool, stop)
            elif spec.role == "payment":
                await run_consumer(spec, client, pool, stop, debit)
            elif spec.role == "ledger":
                await run_consumer(spec, client, pool, stop, complete)
            else:
                raise SystemExit(f"unknown role {spec.role!r}")
        finally:
            await client.close()
    finally:
        await pool.close()


def main(argv: Sequence[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m securebroker.faults.flow SPEC.json")
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    # the SDK's reconnects and resubscribes, for the log a failed run leaves (``--keep``)
    logging.getLogger("securebroker.client").setLevel(logging.INFO)
    asyncio.run(worker_main(WorkerSpec.load(Path(argv[0]))))


if __name__ == "__main__":
    main(sys.argv[1:])
