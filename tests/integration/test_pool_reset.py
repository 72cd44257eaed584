"""The store's pools skip asyncpg's reset query (one round trip per transaction): the store
keeps no session state. What the reset must still guarantee holds: a connection released
inside a transaction comes back with that transaction rolled back."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from securebroker.store.postgres import PostgresStore


async def test_a_connection_released_mid_transaction_comes_back_clean(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = await PostgresStore.connect(pg_dsn, min_size=1, max_size=1)
    try:
        loop = asyncio.get_running_loop()
        handler = loop.get_exception_handler()
        loop.set_exception_handler(lambda _loop, _ctx: None)  # asyncpg reports the open tx
        try:
            async with store.pool.acquire() as conn:
                await conn.execute("BEGIN")
                await conn.execute("CREATE TABLE leaked (x int)")
        finally:
            loop.set_exception_handler(handler)
        async with store.pool.acquire() as conn:  # the only connection: the same one
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('leaked')") is None
            # and no session state to undo: the settings are the pool's own
            assert await conn.fetchval("SHOW timezone") == "UTC"
    finally:
        await store.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_released_connection_sends_no_reset_query(pg_dsn: str) -> None:
    store = await PostgresStore.connect(pg_dsn, min_size=1, max_size=1)
    observer = await asyncpg.connect(pg_dsn)
    try:
        async with store.pool.acquire() as conn, conn.transaction():
            pid = conn.get_server_pid()
            await conn.execute("SELECT 1")
        # released: the backend's last statement is still the transaction's own COMMIT
        last = await observer.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
        assert last.strip().upper().startswith("COMMIT"), last
    finally:
        await observer.close()
        await store.close()
