"""The queue's statements reach its tables by key lookups whatever the statistics say (ADR 0014).

The statistics of a queue table are always stale. Two shapes are tested, each followed by
5,000 rows the statistics do not know of:

- "grown": 200 rows, vacuumed and analyzed, none of them leased (a broker after a quiet
  spell). Planned from these, the lease joined by hash joins over sequential scans of the
  deliveries and messages, and the ack walked the partial index of leased rows (which the
  statistics call empty) for every group, or with hash joins off for every ack.
- "drained": 2,000 rows deleted, then analyzed (not vacuumed): reltuples = 0 over relpages
  > 0, which is what autovacuum's ANALYZE records after a queue drains. The planner scales a
  density of zero by the page count and estimates one row however large the table grows.
  Planned from these, the ack walked the whole primary keys of both tables inside a nested
  loop, once per ack: 8 s for 50 acks with 100,000 queued.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from securebroker.core.broker import ExponentialBackoff
from securebroker.core.model import NackRef
from securebroker.store.postgres import KEY_LOOKUPS, LEASE_SETTINGS, PostgresStore
from securebroker.store.sql import QUERIES as Q

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
#: what the plans must never contain on the queue tables
FORBIDDEN = (
    "Seq Scan on sb_deliveries",
    "Seq Scan on sb_messages",
    "Hash Join",
    "Merge Join",
    "Bitmap Heap Scan",
    "sb_deliveries_leased",
)


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO sb_topics (name, created_at) VALUES ('t', $1)", NOW)
        await conn.execute(
            "INSERT INTO sb_subscriptions (name, topic_id, max_attempts, lease_ms,"
            " backoff_base_ms, backoff_max_ms, created_at)"
            " SELECT 's', id, 10, 30000, 100, 1000, $1 FROM sb_topics",
            NOW,
        )
        yield conn
    finally:
        await conn.close()


async def _add(conn: asyncpg.Connection, n: int, *, leased: bool) -> list[uuid.UUID]:
    """``n`` messages with one delivery each; leased ones have their id as lease token."""
    ids = [uuid.uuid4() for _ in range(n)]
    await conn.execute(
        "INSERT INTO sb_messages (id, topic_id, payload, content_type, producer, published_at)"
        " SELECT i, (SELECT id FROM sb_topics), '\\x00'::bytea, 'x', 'p', $2"
        " FROM unnest($1::uuid[]) AS i",
        ids,
        NOW,
    )
    await conn.execute(
        "INSERT INTO sb_deliveries (message_id, subscription_id, seq, available_at, state,"
        " lease_token)"
        " SELECT m.id, (SELECT id FROM sb_subscriptions), m.seq, m.published_at, $2::smallint,"
        "  CASE WHEN $2::smallint = 1 THEN m.id END"
        " FROM sb_messages m WHERE m.id = ANY($1::uuid[])",
        ids,
        1 if leased else 0,
    )
    return ids


SHAPES = ("grown", "drained")


async def _stale_statistics(
    conn: asyncpg.Connection, *, leased: bool, shape: str = "grown"
) -> list[uuid.UUID]:
    """Statistics of the given shape (module docstring), then 5,000 more rows (leased or not)
    the statistics do not know of."""
    if shape == "grown":
        await _add(conn, 200, leased=False)
        await conn.execute("VACUUM ANALYZE sb_deliveries")
        await conn.execute("VACUUM ANALYZE sb_messages")
    else:
        await _add(conn, 2000, leased=False)
        await conn.execute("DELETE FROM sb_deliveries")
        await conn.execute("DELETE FROM sb_messages")
        await conn.execute("ANALYZE sb_deliveries")
        await conn.execute("ANALYZE sb_messages")
        stats = await conn.fetch(
            "SELECT reltuples, relpages FROM pg_class"
            " WHERE relname IN ('sb_deliveries', 'sb_messages')"
        )
        assert all(r["reltuples"] == 0 and r["relpages"] > 0 for r in stats), stats
    return await _add(conn, 5000, leased=leased)


#: a scan node of a queue table, and what must condition it: a key, never a walk
_SCAN = re.compile(r"(Seq Scan|Index Scan|Index Only Scan|Tid Scan|Bitmap Heap Scan)"
                   r"(?: using \S+)? on (sb_deliveries|sb_messages)\b")  # fmt: skip
_KEYED = ("Index Cond:", "TID Cond:")


async def _explained(conn: asyncpg.Connection) -> list[str]:
    """From here on, the plans of every statement ``conn`` runs, nested ones too (auto_explain
    reports them to the session; ``RESET auto_explain.log_min_duration`` stops it)."""
    plans: list[str] = []
    conn.add_log_listener(lambda _c, msg: plans.append(msg.message))
    await conn.execute("LOAD 'auto_explain'")
    await conn.execute(
        "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
        " SET auto_explain.log_level = 'notice'; SET auto_explain.log_parameter_max_length = 0;"
        " SET client_min_messages = 'notice'"
    )
    return plans


def _assert_lookups(plan: str) -> None:
    for bad in FORBIDDEN:
        assert bad not in plan, f"{bad} in the plan:\n{plan}"
    lines = plan.splitlines()
    for i, line in enumerate(lines):
        if not _SCAN.search(line):
            continue
        depth = len(line) - len(line.lstrip())
        details = []
        for nxt in lines[i + 1 :]:
            if len(nxt) - len(nxt.lstrip()) <= depth or nxt.lstrip().startswith("->"):
                break
            details.append(nxt.strip())
        assert any(d.startswith(_KEYED) for d in details), f"unkeyed scan:\n{line}\n{plan}"


@pytest.mark.parametrize("shape", SHAPES)
async def test_lease_plan_is_index_lookups_on_stale_statistics(
    db: asyncpg.Connection, pg_dsn: str, shape: str
) -> None:
    await _stale_statistics(db, leased=False, shape=shape)
    sub = await db.fetchval("SELECT id FROM sb_subscriptions")
    lease_conn = await asyncpg.connect(pg_dsn, server_settings=LEASE_SETTINGS)
    try:
        async with lease_conn.transaction():
            # the plan the lease connections keep: generic (parameters shown as $n), planned
            # once under force_generic_plan
            await lease_conn.execute(
                "PREPARE lease_q (bigint, timestamptz, integer, integer, timestamptz, text) AS "
                + Q["lease"]
            )
            # (EXECUTE takes no bind parameters: constants of this test, as literals)
            at, until = NOW + timedelta(seconds=1), NOW + timedelta(seconds=30)
            rows = await lease_conn.fetch(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE lease_q"
                f" ({int(sub)}, '{at.isoformat()}', 10, 50, '{until.isoformat()}', 'c')"
            )
            plan = "\n".join(r[0] for r in rows)
            assert "available_at <= $2" in plan  # generic
            _assert_lookups(plan)
            # the leased rows are found by their row ids and their messages by primary key
            assert "Tid Scan on sb_deliveries" in plan
            assert "Index Scan using sb_messages_pkey" in plan
            assert "Index Scan using sb_deliveries_dequeue" in plan
            leased = await lease_conn.fetch(
                Q["lease"], sub, NOW + timedelta(seconds=1), 10, 50, NOW + timedelta(minutes=1),
                "c",
            )  # fmt: skip
    finally:
        await lease_conn.close()
    # the statement still returns whole deliveries, each with its message (EXPLAIN ANALYZE ran
    # the lease too: 50 rows, then 50 others)
    assert len(leased) == 50
    assert all(r["topic"] == "t" and r["payload"] == b"\x00" for r in leased)
    assert await db.fetchval("SELECT count(*) FROM sb_deliveries WHERE state = 1") == 100


@pytest.mark.parametrize("shape", SHAPES)
async def test_ack_plan_is_index_lookups_on_stale_statistics(
    db: asyncpg.Connection, shape: str
) -> None:
    ids = (await _stale_statistics(db, leased=True, shape=shape))[:50]
    sub = await db.fetchval("SELECT id FROM sb_subscriptions")
    # auto_explain reports the plans of the statements inside sb_ack_rows to this session
    plans = await _explained(db)
    before = await db.fetchval("SELECT count(*) FROM sb_deliveries")
    acked = await db.fetch(Q["ack"], ids, [sub] * len(ids), ids)
    await db.execute("RESET auto_explain.log_min_duration")
    assert {r["message_id"] for r in acked} == set(ids)
    nested = [p for p in plans if "FROM sb_deliveries d" in p and "sb_ack_rows" not in p]
    assert len(nested) == 2, plans  # the lookups, then the deletes
    for plan in nested:
        _assert_lookups(plan)
    # one primary-key lookup per ack, driven by the request; the delete by the row ids found
    assert "Index Scan using sb_deliveries_pkey on sb_deliveries d" in nested[0]
    assert "Tid Scan on sb_deliveries d" in nested[1]
    assert "Index Scan using sb_messages_pkey" in nested[1]
    # and the ack did its job: the deliveries and their messages are gone, the rest kept
    assert await db.fetchval("SELECT count(*) FROM sb_messages WHERE id = ANY($1)", ids) == 0
    assert await db.fetchval("SELECT count(*) FROM sb_deliveries") == before - 50


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("query", ["extend", "nack_lock"])
async def test_lease_holder_statements_find_rows_by_key(
    db: asyncpg.Connection, query: str, shape: str
) -> None:
    """Extending or nacking one lease looks its row up by primary key; a plan walking the
    partial index of leased rows, which the statistics call empty, reads every lease held."""
    ids = await _stale_statistics(db, leased=True, shape=shape)
    sub = await db.fetchval("SELECT id FROM sb_subscriptions")
    if query == "extend":
        args: tuple[object, ...] = (ids[0], sub, ids[0], NOW + timedelta(minutes=5))
    else:
        args = ([ids[0]], [sub], [ids[0]])
    async with db.transaction():
        rows = await db.fetch("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + Q[query], *args)
        plan = "\n".join(r[0] for r in rows)
        _assert_lookups(plan)
        assert "Index Scan using sb_deliveries_pkey" in plan
        assert "rows=1" in plan.split("sb_deliveries_pkey", 1)[1].splitlines()[0]


@pytest.mark.parametrize("shape", SHAPES)
async def test_cleanup_checks_each_candidate_by_key(db: asyncpg.Connection, shape: str) -> None:
    """The orphan cleanup's slice looks each message's deliveries up by key; a plan hashing
    every delivery (what NOT EXISTS became) costs in proportion to the whole queue."""
    await _stale_statistics(db, leased=False, shape=shape)
    async with db.transaction():
        rows = await db.fetch(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + Q["cleanup_messages"],
            NOW + timedelta(minutes=5),
            100,
            NOW - timedelta(days=1),
        )
        plan = "\n".join(r[0] for r in rows)
        # (the delete fetches its ids through the primary key, as a bitmap or not)
        for bad in set(FORBIDDEN) - {"Bitmap Heap Scan"}:
            assert bad not in plan, f"{bad} in the plan:\n{plan}"
        assert "Index Only Scan using sb_deliveries_pkey on sb_deliveries d" in plan


async def test_an_ack_matches_key_and_token_together(db: asyncpg.Connection) -> None:
    """The lookups take each request's key and token as one: two held leases acked with their
    tokens swapped ack neither, and nothing is deleted."""
    a, b = await _add(db, 2, leased=True)  # each lease's token is its message id
    sub = await db.fetchval("SELECT id FROM sb_subscriptions")
    assert await db.fetch(Q["ack"], [a, b], [sub, sub], [b, a]) == []
    assert await db.fetchval("SELECT count(*) FROM sb_deliveries WHERE state = 1") == 2
    assert await db.fetchval("SELECT count(*) FROM sb_messages") == 2
    acked = await db.fetch(Q["ack"], [b, a], [sub, sub], [b, a])
    assert {r["message_id"] for r in acked} == {a, b}
    assert await db.fetchval("SELECT count(*) FROM sb_messages") == 0


async def _blocked(conn: asyncpg.Connection, pid: int) -> None:
    """Until ``pid`` waits for a lock (each round is a query: no sleeping, bounded)."""
    async with asyncio.timeout(15):
        while not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            pid,
        ):
            pass


@pytest.mark.parametrize("change", ["extend", "re-lease"])
async def test_an_ack_waits_for_a_concurrent_change_and_rechecks_it(
    db: asyncpg.Connection, pg_dsn: str, change: str
) -> None:
    """The ack locks the row it found and deletes that version: an ack racing an uncommitted
    extend (same token) still acks once it commits; one racing a new lease (a new token) acks
    nothing and leaves the new lease alone."""
    (mid,) = await _add(db, 1, leased=True)
    sub = await db.fetchval("SELECT id FROM sb_subscriptions")
    other = await asyncpg.connect(pg_dsn)
    try:
        tx = other.transaction()
        await tx.start()
        if change == "extend":
            await other.execute(
                Q["extend"], mid, sub, mid, NOW + timedelta(minutes=5)
            )  # fmt: skip
        else:
            await other.execute(
                "UPDATE sb_deliveries SET lease_token = gen_random_uuid(),"
                " attempts = attempts + 1 WHERE message_id = $1",
                mid,
            )
        ack = asyncio.ensure_future(db.fetch(Q["ack"], [mid], [sub], [mid]))
        await _blocked(other, db.get_server_pid())
        await tx.commit()
        acked = await ack
    finally:
        await other.close()
    left = await db.fetchval("SELECT count(*) FROM sb_deliveries WHERE message_id = $1", mid)
    if change == "extend":
        assert [r["message_id"] for r in acked] == [mid]
        assert left == 0
    else:
        assert acked == []
        assert left == 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("query", ["sweep_expired", "sweep_exhausted"])
async def test_sweeps_update_by_row_id(db: asyncpg.Connection, query: str, shape: str) -> None:
    """A sweep updates the rows it picked by row id. Joined back by key, they were a walk of
    the whole primary key on every sweep, with nothing to sweep (35 ms per sweep at 55,000
    queued, growing with the queue). (The exhausted sweep still reads the leases that ran out,
    here all 5,000: that walk is bounded by what there is to check.)"""
    await _stale_statistics(db, leased=True, shape=shape)
    async with db.transaction():
        await db.execute(Q["plan_by_keys"], list(KEY_LOOKUPS), list(KEY_LOOKUPS.values()))
        rows = await db.fetch("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + Q[query], NOW, 1000)
        plan = "\n".join(r[0] for r in rows)
    # the exhausted sweep walks the leased index by expiry, as it should: bounded by the
    # leases that ran out
    _assert_lookups(plan.replace("sb_deliveries_leased", "leased index"))
    assert "Tid Scan on sb_deliveries d" in plan
    assert "rows=0" in plan.splitlines()[0]


async def _add_claims(conn: asyncpg.Connection, n: int) -> list[str]:
    keys = [f"k-{uuid.uuid4()}" for _ in range(n)]
    await conn.execute(
        "INSERT INTO sb_idempotency (topic_id, producer_scope, key, message_id, fingerprint,"
        " created_at) SELECT (SELECT id FROM sb_topics), 'p', k, gen_random_uuid(), '\\x00', $2"
        " FROM unnest($1::text[]) AS k",
        keys,
        NOW,
    )
    return keys


@pytest.mark.parametrize("shape", SHAPES)
async def test_existing_claims_are_looked_up_by_key(db: asyncpg.Connection, shape: str) -> None:
    """A publish whose idempotency keys are already claimed reads those claims by primary
    key (the general path, for every duplicate a producer retries)."""
    await _add_claims(db, 200 if shape == "grown" else 2000)
    if shape == "drained":
        await db.execute("DELETE FROM sb_idempotency")
        await db.execute("ANALYZE sb_idempotency")
    else:
        await db.execute("VACUUM ANALYZE sb_idempotency")
    keys = (await _add_claims(db, 5000))[:20]
    topic = await db.fetchval("SELECT id FROM sb_topics")
    args = ([topic] * len(keys), ["p"] * len(keys), keys)
    async with db.transaction():
        rows = await db.fetch(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + Q["idem_existing"], *args
        )
        plan = "\n".join(r[0] for r in rows)
    _assert_lookups(plan.replace("sb_idempotency", "sb_messages"))  # (same rules, this table)
    # one lookup per requested key
    assert re.search(r"Index Scan using sb_idempotency_pkey on sb_idempotency i .*loops=20\b", plan)
    found = await db.fetch(Q["idem_existing"], *args)
    assert sorted(r["key"] for r in found) == sorted(keys)


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_nack_updates_the_rows_it_locked_by_row_id(
    db: asyncpg.Connection, pg_dsn: str, shape: str
) -> None:
    """The store's nack, 1,000 at once: nack_lock finds each lease by key, nack_apply updates
    the rows it locked by row id. Joined to its 1,000 values without the key-lookup settings, a
    drained table's one-row estimate made nack_apply scan the table once per nack."""
    ids = (await _stale_statistics(db, leased=True, shape=shape))[:1000]
    refs = [NackRef("s", i, i, error="e", delay=timedelta(0)) for i in ids]
    plans = await _explained(db)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        async with db.transaction():
            results = await PostgresStore(pool).nack_in(db, refs, NOW, ExponentialBackoff())
    finally:
        await pool.close()
    await db.execute("RESET auto_explain.log_min_duration")
    assert results == [None] * len(ids)
    applied = [p for p in plans if "UPDATE sb_deliveries d" in p]
    assert len(applied) == 1, plans
    _assert_lookups(applied[0])
    assert "Tid Scan on sb_deliveries d" in applied[0]
    # back to ready, the token gone
    back = await db.fetchval(
        "SELECT count(*) FROM sb_deliveries WHERE message_id = ANY($1) AND state = 0"
        " AND lease_token IS NULL AND last_error = 'e'",
        ids,
    )
    assert back == len(ids)


@pytest.mark.parametrize("shape", SHAPES)
async def test_dead_letters_are_listed_with_their_messages_by_key(
    db: asyncpg.Connection, shape: str
) -> None:
    ids = await _stale_statistics(db, leased=False, shape=shape)
    dead = ids[:5]
    await db.execute(
        "UPDATE sb_deliveries SET state = 2, dead_reason = 'max_attempts', dead_at = $2"
        " WHERE message_id = ANY($1)",
        dead,
        NOW,
    )
    sub = await db.fetchval("SELECT id FROM sb_subscriptions")
    rows = await db.fetch(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + Q["dead_list"], sub, None, 100
    )
    plan = "\n".join(r[0] for r in rows)
    _assert_lookups(plan)
    listed = await db.fetch(Q["dead_list"], sub, None, 100)
    assert sorted(r["message_id"] for r in listed) == sorted(dead)
    assert all(r["topic"] == "t" for r in listed)
