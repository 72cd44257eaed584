"""A crash of PostgreSQL between two transactions never lets a record link to a lost one.

Leases commit asynchronously, so a crash can lose a lease's last "delivered" records after the
broker's lane has moved past them. A broker with a transaction in flight sees the connection
error and retires its lanes. A broker between transactions sees nothing: its pool replaces the
dead connections silently. It tells the crash by ``sb_server_epoch``, an unlogged table that
crash recovery empties (migration 0007), and starts new chains.

The server here is a private one: ``pg_ctl restart -m immediate`` is a crash (no shutdown
checkpoint; crash recovery at start), and ``pg_ctl`` waits until the server is up again.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from securebroker import embedded
from securebroker.audit.checkpoint import SigningKey
from securebroker.audit.log import AuditLog
from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import PublishRequest, SettleRef
from securebroker.store.group import GroupCommitStore
from securebroker.store.migrate import create_database
from tests.conftest import FP_KEY
from tests.integration.test_group_publish_statement import chains_verify


@pytest.fixture
async def crashable() -> AsyncIterator[tuple[object, str, Path]]:
    """A private embedded server: (its handle, the DSN of a migrated database, a work dir)."""
    work = Path(tempfile.mkdtemp(prefix="sb-crash-"))
    server = embedded.start(work / "pgdata", keep=False)
    dsn = embedded.database_uri(server, "crash")
    try:
        await create_database(server.get_uri("postgres"), dsn, "crash")
        yield server, dsn, work
    finally:
        await embedded.stop_restarted(server, log_to=work / "pg_ctl.log")


async def _chains(db: asyncpg.Connection, event: str) -> list[int]:
    rows = await db.fetch("SELECT DISTINCT chain FROM sb_audit WHERE event = $1", event)
    return sorted(r["chain"] for r in rows)


async def test_records_after_a_crash_between_transactions_start_new_chains(
    crashable: tuple[object, str, Path], clock: ManualClock
) -> None:
    server, dsn, work = crashable
    store = await GroupCommitStore.connect_group(dsn, min_size=1, max_size=4, committers=1)
    audit = AuditLog(
        store.pool, signer=SigningKey.generate(), clock=clock, checkpoint_interval=3600
    )
    try:
        await audit.start()
        store.audit = audit
        broker = Broker(store, fingerprint_key=FP_KEY, clock=clock, rng=random.Random(3))
        await broker.create_topic("t")
        await broker.create_subscription("s", "t")
        await broker.publish(PublishRequest("t", b"before"))
        (before,) = await broker.receive("s", 1)  # a lease: committed asynchronously
        # where the lanes stood (the lease's record included, which the crash may lose)
        heads = {h.chain: h.seq for h in audit.heads()}

        assert await embedded.pg_ctl(server, "restart", "-m", "immediate", log_to=work / "log") == 0
        # the pools hand out new connections without an error, as after an unnoticed crash
        await store.pool.expire_connections()
        assert store.lease_pool is not None
        await store.lease_pool.expire_connections()

        await broker.publish(PublishRequest("t", b"after"))
        delivered = await broker.receive("s", 2)
        await broker.ack_batch([SettleRef("s", d.message_id, d.lease_token) for d in delivered])
        assert await audit.checkpoint(final=True) is not None
    finally:
        await audit.close()
        await store.close()
    db = await asyncpg.connect(dsn)
    try:
        published = await _chains(db, "published")
        # The lane in use before the crash was retired: everything after the crash is on new
        # chains (numbered in the order they are created), never linked to a record the crash
        # may have lost. (Whether it lost the lease's "delivered" record depends on whether
        # the WAL writer flushed it first: either way, nothing after may link to it.)
        assert len(published) == 2
        pre = min(published)
        after = await db.fetchval(
            "SELECT chain FROM sb_audit WHERE event = 'published' AND chain <> $1", pre
        )
        assert after > pre
        assert pre not in await _chains(db, "acked")
        assert pre in heads
        for chain, seq in heads.items():  # no record was added to a chain used before
            assert await db.fetchval("SELECT max(seq) FROM sb_audit WHERE chain = $1", chain) <= seq
        lease_lost = before.message_id not in {
            r["message_id"]
            for r in await db.fetch(
                "SELECT unnest(coalesce(message_ids, ARRAY[message_id])) AS message_id"
                " FROM sb_audit WHERE event = 'delivered' AND chain = $1",
                pre,
            )
        }
        # a lost lease means the message was delivered again after the crash
        assert not lease_lost or before.message_id in {d.message_id for d in delivered}
        # and every chain, and the final checkpoint over their heads, verifies
        await chains_verify(db)
    finally:
        await db.close()
