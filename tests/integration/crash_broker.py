"""A broker process that dies right after a publish COMMIT, before any confirm is sent.

Run by ``test_crash_after_commit.py`` as ``python crash_broker.py CONFIG CRASH_AFTER``.

It starts the broker as ``securebroker serve`` does (``load(CONFIG)``, the fingerprint key file,
``BrokerApp``, SIGTERM/SIGINT to stop) with a single change: ``BrokerApp`` builds
``CrashAfterCommitStore``, a ``GroupCommitStore`` whose pool hands out connections whose
transactions report their COMMIT. The committers' code is the real one, untouched: in
``GroupCommitStore._publish_group_jobs`` (and ``_publish_one``) a group runs as

    async with self._tx() as (conn, events):
        results = await self.publish_in(conn, flat, self._retention, events)
    _resolve(jobs, results)  # resolves the futures; the native server confirms from them

and the crash point is the return of ``conn.transaction().__aexit__``: COMMIT has returned
(``synchronous_commit = on``, so the rows are durable) but the connection is not released and no
future is resolved, so no CONFIRM was even queued. Groups of fresh messages take the
one-statement path first (``publish_group``, migration 0005: the statement is the transaction);
there the crash point is the statement's return, again before any future is resolved. On the
CRASH_AFTER-th such COMMIT of a transaction that published, the process reports it and calls
``os._exit(CRASH_EXIT)``: no ``finally``, no shutdown, no flush of anything but the report
line.

stdout, one flushed line per event (fields separated by spaces):

    listening PORT
    queued KEY...               a publish request entered the group-commit queue
    publishing KEY...           a transaction started publishing these messages
    committed N KEY=ID...       the Nth publishing transaction committed (confirms follow)
    crashing N KEY=ID...        the Nth publishing transaction committed; exiting now
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from securebroker.config import load
from securebroker.core.model import PreparedMessage, PublishResult
from securebroker.secrets import read_key
from securebroker.server import app as app_module
from securebroker.server.app import BrokerApp
from securebroker.store.group import GroupCommitStore

#: Exit status of the deliberate crash (distinct from 0, 1, 2 and signal deaths).
CRASH_EXIT = 86


def say(*fields: object) -> None:
    sys.stdout.write(" ".join(str(f) for f in fields) + "\n")
    sys.stdout.flush()


@dataclass
class _Published:
    messages: Sequence[PreparedMessage]
    results: list[PublishResult]


class _Transaction:
    """``conn.transaction()`` that tells the store when a publishing transaction committed."""

    def __init__(self, inner: Any, conn: _Connection) -> None:
        self._inner = inner
        self._conn = conn

    async def __aenter__(self) -> Any:
        self._conn.published = None
        return await self._inner.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any:
        outcome = await self._inner.__aexit__(exc_type, exc, tb)  # COMMIT (or ROLLBACK)
        published, self._conn.published = self._conn.published, None
        if exc_type is None and published is not None:
            self._conn.store.committed(published)  # may not return
        return outcome


class _Connection:
    """A pool connection whose ``transaction()`` is a ``_Transaction``; all else delegated."""

    def __init__(self, inner: Any, store: CrashAfterCommitStore) -> None:
        self._inner = inner
        self.store = store
        self.published: _Published | None = None

    def transaction(self, **kwargs: Any) -> _Transaction:
        return _Transaction(self._inner.transaction(**kwargs), self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Acquire:
    def __init__(self, inner: Any, store: CrashAfterCommitStore) -> None:
        self._inner = inner
        self._store = store

    async def __aenter__(self) -> _Connection:
        return _Connection(await self._inner.__aenter__(), self._store)

    async def __aexit__(self, *exc_info: Any) -> Any:
        return await self._inner.__aexit__(*exc_info)


class _Pool:
    """The store's main pool, handing out ``_Connection``s; all else delegated."""

    def __init__(self, inner: Any, store: CrashAfterCommitStore) -> None:
        self._inner = inner
        self._store = store

    def acquire(self, **kwargs: Any) -> _Acquire:
        return _Acquire(self._inner.acquire(**kwargs), self._store)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CrashAfterCommitStore(GroupCommitStore):
    #: exit after this many publishing COMMITs (set by ``main`` before the broker starts)
    crash_after = 0

    def __init__(self, pool: Any, lease_pool: Any = None, **kwargs: Any) -> None:
        super().__init__(_Pool(pool, self), lease_pool, **kwargs)  # type: ignore[arg-type]
        self.commits = 0

    def submit_publish(
        self, messages: Sequence[PreparedMessage], retention: timedelta
    ) -> asyncio.Future[list[PublishResult]]:
        fut = super().submit_publish(messages, retention)
        say("queued", *(m.idempotency_key for m in messages))
        return fut

    async def publish_in(
        self,
        conn: Any,
        messages: Sequence[PreparedMessage],
        retention: timedelta,
        events: Any = None,
    ) -> list[PublishResult]:
        say("publishing", *(m.idempotency_key for m in messages))
        results = await super().publish_in(conn, messages, retention, events)
        if isinstance(conn, _Connection):
            conn.published = _Published(messages, results)
        return results

    async def publish_group(
        self, messages: Sequence[PreparedMessage]
    ) -> list[PublishResult] | None:
        """The one-statement path: its statement is its transaction, so when it returns with
        results the group is committed; crash (or report) before any future is resolved."""
        say("publishing", *(m.idempotency_key for m in messages))
        results = await super().publish_group(messages)
        if results is not None:
            self.committed(_Published(messages, results))
        return results

    def committed(self, published: _Published) -> None:
        """Called right after COMMIT returned, before the committer resolves any future."""
        self.commits += 1
        pairs = [
            f"{m.idempotency_key}={r.message_id}"
            for m, r in zip(published.messages, published.results, strict=True)
        ]
        if self.commits == self.crash_after:
            say("crashing", self.commits, *pairs)
            os._exit(CRASH_EXIT)
        say("committed", self.commits, *pairs)


async def serve(config_path: Path, crash_after: int) -> None:
    """``securebroker serve`` (cli ``_serve_until_signal``), with the crashing store."""
    config = load(config_path)
    key = read_key(Path(config.broker.fingerprint_key_file), setting="broker.fingerprint_key_file")
    CrashAfterCommitStore.crash_after = crash_after
    app_module.GroupCommitStore = CrashAfterCommitStore  # type: ignore[misc]
    app = BrokerApp(config, fingerprint_key=key)
    running = await app.start()
    if not isinstance(running.store, CrashAfterCommitStore):
        raise SystemExit("crash_broker: the broker did not use the crashing store")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    say("listening", running.native.port)
    try:
        await stop.wait()
    finally:
        await app.stop()


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or not argv[1].isdigit() or int(argv[1]) < 1:
        raise SystemExit("usage: crash_broker.py CONFIG CRASH_AFTER (a count >= 1)")
    asyncio.run(serve(Path(argv[0]), int(argv[1])))


if __name__ == "__main__":
    main(sys.argv[1:])
