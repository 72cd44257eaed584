"""Plain-SQL migrations applied by our own runner (``securebroker migrate``).

- Files ``migrations/NNNN_name.sql`` are applied in number order, each in its own transaction,
  and recorded with a SHA-256 checksum in ``sb_schema_migrations``.
- A session-level advisory lock makes concurrent runners wait for each other instead of racing.
- An applied migration whose file has changed stops the runner (and the broker) with an error:
  history is never rewritten silently. Running twice is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from securebroker.errors import BrokerError

LOCK_KEY = 0x5EC0_B40C  # arbitrary constant shared by every runner
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS sb_schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(BrokerError):
    code = "migration"
    wire = 3


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str


def default_dir() -> Path:
    """``$SECUREBROKER_MIGRATIONS``, else the ``migrations/`` folder beside the package."""
    env = os.environ.get("SECUREBROKER_MIGRATIONS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "migrations"


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or default_dir()
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory}")
    found: list[Migration] = []
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        m = _FILE.match(path.name)
        if m is None:
            raise MigrationError(f"migration file name must look like 0001_name.sql: {path.name}")
        text = path.read_text(encoding="utf-8")
        digest = hashlib.sha256(text.encode()).hexdigest()
        found.append(Migration(int(m.group(1)), path.stem, text, digest))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when up to date)."""
    directory = directory or default_dir()
    migrations = discover(directory)
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(_BOOTSTRAP)
        rows = await conn.fetch("SELECT version, name, checksum FROM sb_schema_migrations")
        applied = {r["version"]: (r["name"], r["checksum"]) for r in rows}
        known = {m.version for m in migrations}
        for version, (name, _) in applied.items():
            if version not in known:
                raise MigrationError(f"applied migration {name} is missing from {directory}")
        done: list[str] = []
        for m in migrations:
            prior = applied.get(m.version)
            if prior is not None:
                if prior[1] != m.checksum:
                    raise MigrationError(
                        f"migration {m.name} was edited after it was applied "
                        f"(recorded checksum {prior[1][:12]}, file {m.checksum[:12]}); "
                        "add a new migration instead"
                    )
                continue
            async with conn.transaction():
                # Migration files are trusted project files, never input.
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO sb_schema_migrations (version, name, checksum)"
                    " VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            done.append(m.name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def migrate_dsn(dsn: str, directory: Path | None = None) -> list[str]:
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise MigrationError(f"cannot connect to PostgreSQL: {exc}") from exc
    try:
        return await migrate(conn, directory)
    finally:
        await conn.close()


async def pending(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Migrations not applied yet (the broker refuses to serve an outdated schema)."""
    migrations = discover(directory)
    exists = await conn.fetchval("SELECT to_regclass('sb_schema_migrations') IS NOT NULL")
    if not exists:
        return [m.name for m in migrations]
    rows = await conn.fetch("SELECT version, checksum FROM sb_schema_migrations")
    applied = {r["version"]: r["checksum"] for r in rows}
    for m in migrations:
        if m.version in applied and applied[m.version] != m.checksum:
            raise MigrationError(f"migration {m.name} was edited after it was applied")
    return [m.name for m in migrations if m.version not in applied]


async def create_database(admin_dsn: str, dsn: str, name: str, *, fresh: bool = False) -> None:
    """Create database ``name`` (dropping it first when ``fresh``) and migrate it.

    For bootstrap tools (``securebroker dev``, the benchmark) on a server they own. ``name`` is a
    constant of ours, never input, and is quoted as an identifier.
    """
    ident = '"' + name.replace('"', '""') + '"'
    conn = await asyncpg.connect(admin_dsn)
    try:
        if fresh:
            await conn.execute("DROP DATABASE IF EXISTS " + ident)
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute("CREATE DATABASE " + ident)
    finally:
        await conn.close()
    await migrate_dsn(dsn)
