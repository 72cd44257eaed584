"""The lease, the ack and the extend plan by index lookups whatever the statistics say (ADR 0014).

The statistics of a queue table are always stale. Here they are made to say "tiny" (200 rows,
vacuumed and analyzed, none of them leased) before the tables grow, which is what a broker sees
after a quiet spell: planned from such statistics, the lease used to join by hash joins over
sequential scans of the deliveries and messages, and the ack walked the partial index of leased
rows (which the statistics call empty) for every group, or with hash joins off for every ack.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from securebroker.store.postgres import LEASE_SETTINGS
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


async def _stale_statistics(conn: asyncpg.Connection, *, leased: bool) -> list[uuid.UUID]:
    """Statistics of 200-row tables with nothing leased, then 5,000 more rows (leased or
    not) the statistics do not know of."""
    await _add(conn, 200, leased=False)
    await conn.execute("VACUUM ANALYZE sb_deliveries")
    await conn.execute("VACUUM ANALYZE sb_messages")
    return await _add(conn, 5000, leased=leased)


def _assert_lookups(plan: str) -> None:
    for bad in FORBIDDEN:
        assert bad not in plan, f"{bad} in the plan:\n{plan}"


async def test_lease_plan_is_index_lookups_on_stale_statistics(
    db: asyncpg.Connection, pg_dsn: str
) -> None:
    await _stale_statistics(db, leased=False)
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


async def test_ack_plan_is_index_lookups_on_stale_statistics(db: asyncpg.Connection) -> None:
    ids = (await _stale_statistics(db, leased=True))[:50]
    sub = await db.fetchval("SELECT id FROM sb_subscriptions")
    # auto_explain reports the plans of the statements inside sb_ack_rows to this session
    plans: list[str] = []
    db.add_log_listener(lambda _c, msg: plans.append(msg.message))
    await db.execute("LOAD 'auto_explain'")
    await db.execute(
        "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
        " SET auto_explain.log_level = 'notice'; SET auto_explain.log_parameter_max_length = 0;"
        " SET client_min_messages = 'notice'"
    )
    acked = await db.fetch(Q["ack"], ids, [sub] * len(ids), ids)
    await db.execute("RESET auto_explain.log_min_duration")
    assert {r["message_id"] for r in acked} == set(ids)
    nested = [p for p in plans if "DELETE FROM sb_deliveries" in p]
    assert nested, plans
    _assert_lookups(nested[0])
    # one primary-key lookup per ack, driven by the request
    assert "Index Scan using sb_deliveries_pkey on sb_deliveries d" in nested[0]
    assert "Index Scan using sb_messages_pkey" in nested[0]
    # and the ack did its job: the deliveries and their messages are gone, the rest kept
    assert await db.fetchval("SELECT count(*) FROM sb_messages WHERE id = ANY($1)", ids) == 0
    assert await db.fetchval("SELECT count(*) FROM sb_deliveries") == 5200 - 50


@pytest.mark.parametrize("query", ["extend", "nack_lock"])
async def test_lease_holder_statements_find_rows_by_key(db: asyncpg.Connection, query: str) -> None:
    """Extending or nacking one lease looks its row up by primary key; a plan walking the
    partial index of leased rows, which the statistics call empty, reads every lease held."""
    ids = await _stale_statistics(db, leased=True)
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


async def test_cleanup_checks_each_candidate_by_key(db: asyncpg.Connection) -> None:
    """The orphan cleanup's slice looks each message's deliveries up by key; a plan hashing
    every delivery (what NOT EXISTS became) costs in proportion to the whole queue."""
    await _stale_statistics(db, leased=False)
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
