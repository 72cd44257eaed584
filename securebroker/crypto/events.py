"""Following key events: ``NOTIFY sb_keys`` from ``securebroker keys …`` to running brokers."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from securebroker.crypto.envelope import Envelope
from securebroker.crypto.keystore import CHANNEL

log = logging.getLogger(__name__)


async def follow(
    dsn: str, env: Envelope, stop: asyncio.Event, *, refresh_every: float = 30.0
) -> None:
    """Apply key events to ``env`` until ``stop`` is set, on a connection of its own.

    After a reconnect every cached key is dropped (events may have been missed), and every
    ``refresh_every`` seconds the keyring is re-read to catch a missed rotation.
    """
    first = True
    while not stop.is_set():
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("key events: cannot connect (%s), retrying", exc.__class__.__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
            continue
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _c, ev=lost: ev.set())
            await conn.add_listener(CHANNEL, lambda _c, _pid, _ch, data: env.on_event(str(data)))
            if not first:
                env.on_event("reconnected")
            first = False
            while not stop.is_set() and not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(refresh_every):
                        await _either(stop, lost)
                if not stop.is_set() and not lost.is_set():
                    env.refresh()
        finally:
            with contextlib.suppress(Exception):
                await conn.close()


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
