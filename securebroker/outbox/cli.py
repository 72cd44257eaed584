"""``securebroker outbox``: install the producer outbox and run its relay.

    securebroker outbox migrate --dsn postgresql://app@db/orders
    securebroker outbox relay --dsn postgresql://app@db/orders --host broker --cert ... [--once]

Both talk to the PRODUCER's database (``--dsn``), not the broker's; ``relay`` is a client of
the broker like ``publish`` (same ``--host/--port/--cert/--key/--ca/--token`` options). Errors
are one line on stderr and exit status 1, never a traceback.

The group is built by ``build(cli)`` from the option helpers of the CLI module that registers
it (``securebroker.cli``, which is ``__main__`` under ``python -m securebroker.cli``), so this
module never imports that one: no import cycle, whichever of the two is loaded first.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import asyncpg
import click

from securebroker.client import Client, connect
from securebroker.errors import ConfigError, Unavailable
from securebroker.outbox.relay import OutboxRelay, RelayStats
from securebroker.outbox.table import install, installed

if TYPE_CHECKING:
    from securebroker.cli import Target

Command = Callable[..., None]
TokenProvider = Callable[[], Awaitable[str]] | None

#: how long a publish waits for the broker connection to come back before the row is recorded
#: as failed (and retried with backoff) in the long-running relay
RETRY_FOR = 10.0

dsn_option = click.option(
    "--dsn",
    required=True,
    envvar="SECUREBROKER_OUTBOX_DSN",
    help="the producer's PostgreSQL URI (where sb_outbox lives)",
)


def _bad_dsn(exc: Exception) -> ConfigError:
    # the class only: the message may quote parts of the DSN, which can hold a password
    return ConfigError(f"--dsn: not a usable PostgreSQL URI ({exc.__class__.__name__})")


async def _connect_db(dsn: str) -> asyncpg.Connection[asyncpg.Record]:
    try:
        return await asyncpg.connect(dsn)
    except (asyncpg.InterfaceError, ValueError) as exc:  # a malformed DSN, bad TLS options
        raise _bad_dsn(exc) from None
    except OSError as exc:
        raise Unavailable(f"cannot connect to the outbox database: {exc}") from None


async def _pool(dsn: str, max_size: int) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            server_settings={"application_name": "securebroker-outbox-relay"},
        )
    except (asyncpg.InterfaceError, ValueError) as exc:
        raise _bad_dsn(exc) from None
    except OSError as exc:
        raise Unavailable(f"cannot connect to the outbox database: {exc}") from None
    assert pool is not None
    return pool


async def _client(t: Target, token_provider: TokenProvider, *, reconnect: bool) -> Client:
    for label, path in (("--cert", t.cert), ("--key", t.key), ("--ca", t.ca)):
        if not path.exists():
            raise ConfigError(f"{label}: {path} not found")
    return await connect(
        t.host,
        t.port,
        cert=t.cert,
        key=t.key,
        ca=t.ca,
        token=t.token,
        token_provider=token_provider,
        reconnect=reconnect,
        retry_for=RETRY_FOR if reconnect else 0.0,
    )


async def _relay(
    t: Target,
    token_provider: TokenProvider,
    dsn: str,
    *,
    once: bool,
    batch: int,
    poll: float,
) -> RelayStats:
    pool = await _pool(dsn, max_size=2)
    try:
        async with pool.acquire() as conn:
            if not await installed(conn):
                raise ConfigError(
                    "sb_outbox not found in that database (run `securebroker outbox migrate`)"
                )
        client = await _client(t, token_provider, reconnect=not once)
        try:
            relay = OutboxRelay(pool, client, batch=batch, poll=poll)
            if once:
                while await relay.relay_once() > 0:
                    pass
            else:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
                        loop.add_signal_handler(sig, stop.set)
                click.echo("outbox relay: running (SIGTERM or Ctrl-C stops it)", err=True)
                await relay.run(stop)
            return relay.stats
        finally:
            await client.close()
    finally:
        await pool.close()


def build(cli: ModuleType) -> click.Group:
    """The ``outbox`` command group, made with ``cli``'s helpers (``friendly``,
    ``client_options``, ``_target``, ``_token_provider``, ``_run``, ``_setup_logging``)."""
    friendly: Callable[[Command], Command] = cli.friendly
    client_options: Callable[[str], Callable[[Command], Command]] = cli.client_options
    group = click.Group(
        "outbox", help="Producer outbox: a table in YOUR database, relayed to the broker once."
    )

    @group.command("migrate")
    @dsn_option
    @friendly
    def migrate(dsn: str) -> None:
        """Create the sb_outbox table in the producer's database (safe to run twice)."""

        async def work() -> None:
            conn = await _connect_db(dsn)
            try:
                await install(conn)
            finally:
                await conn.close()

        cli._run(work())
        click.echo("outbox: sb_outbox is installed")

    @group.command("relay")
    @dsn_option
    @click.option("--once", is_flag=True, help="publish what is due now, then exit")
    @click.option("--batch", type=click.IntRange(1, 10_000), default=100, show_default=True)
    @click.option(
        "--poll",
        type=click.FloatRange(min=0.01),
        default=0.25,
        show_default=True,
        help="seconds between looks at an idle outbox",
    )
    @click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
    )
    @click.option("--log-json", is_flag=True, help="JSON log lines")
    @client_options("dev-client")
    @friendly
    def relay(**kw: Any) -> None:
        """Publish pending outbox rows to the broker (until SIGTERM/SIGINT, or --once)."""
        t: Target = cli._target(kw)
        once: bool = kw["once"]
        if not once:
            cli._setup_logging(kw["log_level"], kw["log_json"])
        stats: RelayStats = cli._run(
            _relay(
                t,
                cli._token_provider(t),
                kw["dsn"],
                once=once,
                batch=kw["batch"],
                poll=kw["poll"],
            )
        )
        summary = f"sent {stats.sent} ({stats.duplicates} duplicates), failed {stats.failed}"
        click.echo(f"outbox relay: {summary}", err=not once)
        if once and stats.failed:
            click.echo(
                f"error: outbox: {stats.failed} publish attempts failed; the rows stay in "
                "sb_outbox (see last_error) and are retried after their backoff",
                err=True,
            )
            sys.exit(1)

    return group
