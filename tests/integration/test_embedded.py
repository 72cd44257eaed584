"""The embedded server gets queue tuning (frequent autovacuum) from dev and the benchmark."""

from __future__ import annotations

import asyncpg

from securebroker import embedded
from tests.conftest import PgServer


async def test_tune_sets_short_autovacuum_naptime(pg_server: PgServer) -> None:
    uri = pg_server.uri("postgres")
    await embedded.tune(uri)
    conn = await asyncpg.connect(uri)
    try:
        assert await conn.fetchval("SHOW autovacuum_naptime") == "5s"
    finally:
        await conn.close()
