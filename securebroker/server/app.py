"""The broker process: store, core, front doors and maintenance, started and stopped as one.

Startup order: connect to PostgreSQL → refuse an outdated schema → build the core → start the
listeners → start maintenance. Shutdown (SIGTERM/SIGINT) runs it backwards: stop accepting,
let connections finish in-flight commits (bounded by a grace period), stop maintenance, close
the pool. A confirm is only ever sent after its commit, so stopping at any point loses nothing
that was confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from securebroker.audit.checkpoint import SigningKey
from securebroker.audit.log import AuditLog
from securebroker.audit.record import BROKER, AuditEvent, Event, Outcome
from securebroker.audit.service import AuditService
from securebroker.authz.service import Auth, build_auth
from securebroker.clock import Clock, SystemClock
from securebroker.config import Config
from securebroker.core.broker import Broker
from securebroker.crypto.admin import build_envelope, open_keyring
from securebroker.crypto.envelope import Envelope
from securebroker.crypto.events import follow
from securebroker.crypto.keystore import PostgresKeyStore
from securebroker.errors import ConfigError, Unavailable
from securebroker.server.admin import AdminService
from securebroker.server.auth import Authenticator, Authorizer
from securebroker.server.native import ListenerSettings, NativeServer, Wakeups
from securebroker.server.seclog import SecurityLog
from securebroker.store.group import GroupCommitStore
from securebroker.store.migrate import MigrationError, pending
from securebroker.store.postgres import PostgresStore
from securebroker.telemetry.setup import BrokerTracing, configure_tracing
from securebroker.tls import server_context

log = logging.getLogger("securebroker")


@dataclass
class Running:
    broker: Broker
    native: NativeServer
    store: PostgresStore


def listener_settings(config: Config, token_grace: float = 0.0) -> ListenerSettings:
    lc = config.listener
    for key in ("cert", "key", "ca"):
        if not getattr(lc, key):
            raise ConfigError(f"listener.{key}: required (mutual TLS is mandatory)")
    ctx = server_context(
        cert=Path(lc.cert),
        key=Path(lc.key),
        ca=Path(lc.ca),
        crl=Path(lc.crl) if lc.crl else None,
        min_version=lc.min_tls,
    )
    return ListenerSettings(
        ssl_context=ctx,
        host=lc.host,
        port=lc.port,
        handshake_timeout=lc.handshake_timeout_ms / 1000,
        idle_timeout=lc.idle_timeout_ms / 1000,
        max_connections=lc.max_connections,
        max_connections_per_identity=lc.max_connections_per_identity,
        token_grace=token_grace,
    )


class BrokerApp:
    def __init__(
        self,
        config: Config,
        *,
        fingerprint_key: bytes,
        clock: Clock | None = None,
        auth: Auth | None = None,
    ) -> None:
        """``auth`` defaults to what ``config.auth`` describes (JWT + policies); there is no
        allow-all default."""
        self.config = config
        self.fingerprint_key = fingerprint_key
        self.clock = clock
        self.auth = auth or build_auth(config.auth)
        self.authenticator: Authenticator = self.auth.authenticator
        self.authorizer: Authorizer = self.auth.authorizer
        self.running: Running | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._keys: asyncio.Task[None] | None = None
        self.envelope: Envelope | None = None
        #: the broker's own spans (``[telemetry] traces``); None when off
        self.tracing: BrokerTracing | None = None
        self.audit: AuditLog | None = None
        self._stop = asyncio.Event()

    async def start(self) -> Running:
        settings = listener_settings(self.config, self.auth.token_grace)
        self.config.audit.validate()
        signer = None
        if self.config.audit.enabled:
            signer = SigningKey.load(self.config.audit.signing_key, setting="audit.signing_key")
        if self.tracing is None:
            self.tracing = configure_tracing(self.config.telemetry)
        await self.auth.authenticator.start()  # a missing or broken JWKS stops startup here
        db = self.config.database
        b = self.config.broker
        store: PostgresStore
        if b.group_commit:
            store = await GroupCommitStore.connect_group(
                db.dsn, min_size=db.pool_min, max_size=db.pool_max, committers=b.group_committers
            )
        else:
            store = await PostgresStore.connect(db.dsn, min_size=db.pool_min, max_size=db.pool_max)
        try:
            async with store.pool.acquire() as conn:
                todo = await pending(conn)  # type: ignore[arg-type]
            if todo:
                raise MigrationError(
                    f"database schema is behind ({', '.join(todo)} pending): "
                    "run `securebroker migrate` first"
                )
            if signer is not None:
                self.audit = AuditLog(
                    store.pool,
                    signer=signer,
                    clock=self.clock or SystemClock(),
                    checkpoint_interval=self.config.audit.checkpoint_interval_seconds,
                )
                await self.audit.start()
                store.audit = self.audit
                self.auth.on_reload = self._policy_reloaded
            else:
                log.warning("audit.enabled = false: NO audit trail is written (benchmarks only)")
            self.envelope = self._envelope(store)
            broker = Broker(
                store,
                fingerprint_key=self.fingerprint_key,
                settings=self.config.core_settings(),
                clock=self.clock,
                envelope=self.envelope,
            )
            native = NativeServer(
                broker,
                settings,
                authenticator=self.authenticator,
                authorizer=self.authorizer,
                admin=AdminService(
                    broker,
                    self.authorizer,
                    AuditService(self.audit) if self.audit is not None else None,
                ),
                wakeups=Wakeups(),
                tracer=None if self.tracing is None else self.tracing.tracer,
            )
            # the specific reasons, which peers never see (the audit trail takes them over in #7)
            seclog = SecurityLog()
            native.on_refused = seclog.refused
            native.on_denied = seclog.denied
            if self.audit is not None:
                native.on_audit = self.audit.record
            await native.start()
        except BaseException:
            if self.audit is not None:
                await self.audit.close()
            await store.close()
            raise
        self.running = Running(broker, native, store)
        self._maintenance = asyncio.ensure_future(self._maintain(broker))
        self._watch = asyncio.ensure_future(self._watch_auth())
        if self.envelope is not None:
            self._keys = asyncio.ensure_future(
                follow(self.config.database.dsn, self.envelope, self._stop)
            )
        log.info("native listener on %s:%d", settings.host, native.port)
        return self.running

    async def _maintain(self, broker: Broker) -> None:
        """Dead-letter expired messages and exhausted leases; delete settled rows in batches."""
        b = self.config.broker
        loop = asyncio.get_running_loop()
        next_cleanup = loop.time()
        while not self._stop.is_set():
            try:
                while True:  # drain in bounded batches
                    swept = await broker.sweep()
                    if swept.expired + swept.exhausted == 0:
                        break
                if loop.time() >= next_cleanup:
                    await broker.cleanup()
                    next_cleanup = loop.time() + b.cleanup_interval_ms / 1000
            except (Unavailable, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("maintenance failed, will retry: %s", exc.__class__.__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(b.sweep_interval_ms / 1000):
                    await self._stop.wait()

    def _envelope(self, store: PostgresStore) -> Envelope | None:
        cfg = self.config.encryption
        keyring = open_keyring(cfg)
        if keyring is None:
            log.warning(
                "encryption.keyring = none: payloads are stored in PLAINTEXT "
                "(for benchmarks and tests only)"
            )
            return None
        env = build_envelope(cfg, keyring, PostgresKeyStore(store.pool, self.audit), self.clock)
        log.info(
            "payload encryption on: %s keyring, primary KEK v%d", keyring.provider, env.primary
        )
        return env

    def _policy_reloaded(self, ok: bool, info: str) -> None:
        """A policy reload (or a refused one) goes into the audit trail."""
        if self.audit is None:
            return
        detail: dict[str, str | int | bool | None] = (
            {"digest": info, "generation": self.auth.policies.generation}
            if ok
            else {"error": info[:512]}
        )
        self.audit.record(
            [
                AuditEvent(
                    at=self.audit.clock.now(),
                    event=Event.POLICY_RELOADED,
                    actor=BROKER,
                    outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
                    detail=detail,
                )
            ]
        )

    async def reload(self) -> None:
        """SIGHUP: reload policies and keys now. Bad files are rejected; the old ones stay."""
        self.auth.reload_policies()
        await self.auth.authenticator.refresh_keys()

    async def _watch_auth(self) -> None:
        """Reload policies when their files change; refresh the JWKS URL periodically. (The JWKS
        file is re-checked on every HELLO/AUTH, which is cheap: a ``stat``.)"""
        cfg = self.config.auth
        loop = asyncio.get_running_loop()
        next_jwks = loop.time() + cfg.jwks_refresh_seconds
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.policy_poll_seconds):
                    await self._stop.wait()
            try:
                if self.auth.policies.changed_on_disk():
                    self.auth.reload_policies()
                verifier = self.auth.authenticator.verifier
                if verifier is not None and loop.time() >= next_jwks:
                    next_jwks = loop.time() + cfg.jwks_refresh_seconds
                    await verifier.keys.fetch_url(force=True)
            except OSError as exc:
                log.warning("policy/key watch failed, will retry: %s", exc.__class__.__name__)

    async def stop(self, grace: float = 10.0) -> None:
        self._stop.set()
        running, self.running = self.running, None
        if running is not None:
            await running.native.close(grace)
        for task in (self._maintenance, self._watch, self._keys):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.audit is not None:
            await self.audit.close()  # queued events, then the final signed checkpoint
        if running is not None:
            await running.store.close()
        tracing, self.tracing = self.tracing, None
        if tracing is not None:  # flush the spans still batched (blocking: off the loop)
            await asyncio.to_thread(tracing.shutdown)
