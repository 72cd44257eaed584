"""An in-process ``NativeServer`` on real PostgreSQL and real mutual TLS, for the integration tests.

The server runs on 127.0.0.1 with port 0, on a group-commit store for the test's fresh
database (``pg_dsn``) and a ``Broker`` driven by the test's ``ManualClock``: leases expire
when the test advances the clock, never by waiting. TLS material is a development PKI
generated in ``tmp_path`` (with a CRL revoking one certificate), as in ``test_tls_refusals.py``.

``native_factory(**overrides)`` starts a server with ``ListenerSettings`` overrides (connection
limits, protocol limits); ``native`` is one with the defaults. Every refusal the server reports
through ``NativeServer.on_refused`` is recorded in ``NativeHarness.refusals``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from securebroker.audit.checkpoint import SigningKey
from securebroker.audit.log import AuditLog
from securebroker.audit.service import AuditService
from securebroker.client import Client, TokenProvider, connect
from securebroker.clock import ManualClock
from securebroker.core.broker import Broker
from securebroker.core.model import SubscriptionCounts
from securebroker.protocol import PREAMBLE, FrameDecoder, Hello, encode
from securebroker.protocol import frames as f
from securebroker.server.admin import AdminService
from securebroker.server.auth import (
    AllowAll,
    Authenticator,
    Authorizer,
    CertificateAuthenticator,
)
from securebroker.server.native import Connection, Consumer, ListenerSettings, NativeServer
from securebroker.store.group import GroupCommitStore
from securebroker.store.postgres import PostgresStore
from securebroker.tls import DevPki, client_context, ensure_dev_pki, issue_client_cert, write_crl
from securebroker.tls import server_context as make_server_context

#: Upper bound for every wait on the network or on the server; only matters when something hangs.
IO_TIMEOUT = 15.0
#: The same key as tests/conftest.py (not importable from here without a package).
FP_KEY = b"test-fingerprint-key-0123456789ab"

CLIENT = "dev-client"
ADMIN = "dev-admin"
CLIENT_PRINCIPAL = "spiffe://securebroker.dev/dev-client"
ADMIN_PRINCIPAL = "spiffe://securebroker.dev/dev-admin"


@dataclass(frozen=True)
class TlsMaterial:
    pki: DevPki
    crl: Path
    revoked: tuple[Path, Path]

    def client_context(self, name: str = CLIENT, **kw: Any) -> ssl.SSLContext:
        cert, key = self.pki.clients[name]
        return client_context(cert=cert, key=key, ca=self.pki.ca_cert, **kw)


@dataclass
class NativeHarness:
    server: NativeServer
    broker: Broker
    store: PostgresStore
    clock: ManualClock
    tls: TlsMaterial
    #: the audit trail, written in the store's transactions (None with ``audit=False``)
    audit: AuditLog | None = None
    refusals: list[tuple[str, str]] = field(default_factory=list)
    #: authorization denials ``(principal, reason)`` reported through ``NativeServer.on_denied``
    denials: list[tuple[str, str]] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    _refused: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.server.port

    # -- clients ---------------------------------------------------------------------------
    async def connect(
        self,
        name: str = CLIENT,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reconnect: bool = True,
        retry_for: float = IO_TIMEOUT,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        tracer_provider: Any = None,
    ) -> Client:
        """An SDK client over mutual TLS (with a bearer token, if given; its spans going to
        ``tracer_provider``, default OpenTelemetry's global one); closed at teardown."""
        cert, key = self.tls.pki.clients.get(name, (Path("unused"), Path("unused")))
        async with asyncio.timeout(IO_TIMEOUT):
            client = await connect(
                self.host,
                self.port,
                cert=cert,
                key=key,
                ca=self.tls.pki.ca_cert,
                ssl_context=ssl_context or self.tls.client_context(name),
                reconnect=reconnect,
                connect_timeout=IO_TIMEOUT,
                retry_for=retry_for,
                token=token,
                token_provider=token_provider,
                tracer_provider=tracer_provider,
            )
        self.clients.append(client)
        return client

    async def open_raw(
        self, name: str = CLIENT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TLS connection that speaks raw bytes (nothing sent yet)."""
        async with asyncio.timeout(IO_TIMEOUT):
            return await asyncio.open_connection(
                self.host, self.port, ssl=self.tls.client_context(name)
            )

    async def raw_hello(
        self, name: str = CLIENT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, FrameDecoder, f.Welcome]:
        """A raw TLS connection past PREAMBLE + HELLO, with the WELCOME it got."""
        reader, writer = await self.open_raw(name)
        writer.write(PREAMBLE + encode(Hello(client="raw-test"), 1))
        decoder = FrameDecoder(role="client")
        frames = await read_frames(reader, decoder, count=1)
        assert len(frames) == 1 and isinstance(frames[0][1], f.Welcome), frames
        return reader, writer, decoder, frames[0][1]

    # -- server-side views --------------------------------------------------------------------
    def connection(self, session: str) -> Connection:
        for conn in self.server.connections:
            if conn.session == session:
                return conn
        raise AssertionError(f"no server connection with session {session}")

    def connection_of(self, client: Client) -> Connection:
        link = client._link
        assert link is not None and link.welcome is not None
        return self.connection(link.welcome.session)

    def consumers(self, subscription: str) -> list[Consumer]:
        return [
            c
            for conn in self.server.connections
            for c in conn.consumers.values()
            if c.subscription == subscription
        ]

    async def counts(self, subscription: str) -> SubscriptionCounts:
        counts = (await self.broker.get_subscription(subscription)).counts
        assert counts is not None
        return counts

    async def message_count(self) -> int:
        """Messages stored, whoever published them."""
        async with self.store.pool.acquire() as conn:
            n: int = await conn.fetchval("SELECT count(*) FROM sb_messages")
        return n

    # -- refusals -------------------------------------------------------------------------------
    def _on_denied(self, peer: str, principal: str, reason: str) -> None:
        self.denials.append((principal, reason))

    def _on_refused(self, peer: str, reason: str) -> None:
        self.refusals.append((peer, reason))
        self._refused.set()

    def refusal(self, needle: str) -> str | None:
        for _peer, reason in self.refusals:
            if needle.lower() in reason.lower():
                return reason
        return None

    async def wait_refusal(self, needle: str) -> str:
        """Wait until the server reported a refusal whose reason contains ``needle``."""
        async with asyncio.timeout(IO_TIMEOUT):
            while (reason := self.refusal(needle)) is None:
                self._refused.clear()
                await self._refused.wait()
        return reason


async def read_frames(
    reader: asyncio.StreamReader,
    decoder: FrameDecoder,
    *,
    count: int | None = None,
    until: Callable[[f.Frame], bool] | None = None,
) -> list[tuple[int, f.Frame]]:
    """Read frames until ``count`` arrived, ``until`` matched one, or EOF (bounded in time)."""
    out: list[tuple[int, f.Frame]] = []
    async with asyncio.timeout(IO_TIMEOUT):
        while True:
            data = await reader.read(65536)
            if not data:
                return out
            for env in decoder.feed(data):
                out.append((env.request_id, env.frame))
                if until is not None and until(env.frame):
                    return out
            if count is not None and len(out) >= count:
                return out


async def read_to_eof(
    reader: asyncio.StreamReader, decoder: FrameDecoder
) -> tuple[list[f.Frame], BaseException | None]:
    """Frames the server sent until it closed; a reset or TLS error ends the read too."""
    frames: list[f.Frame] = []
    async with asyncio.timeout(IO_TIMEOUT):
        while True:
            try:
                data = await reader.read(65536)
            except (ConnectionError, ssl.SSLError) as exc:
                return frames, exc
            if not data:
                return frames, None
            frames.extend(env.frame for env in decoder.feed(data))


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        async with asyncio.timeout(IO_TIMEOUT):
            await writer.wait_closed()


@pytest.fixture
def tls_material(tmp_path: Path) -> TlsMaterial:
    pki = ensure_dev_pki(tmp_path / "pki", clients=(CLIENT, ADMIN, "other-client"))
    revoked = issue_client_cert(pki, "revoked-client")
    serial = x509.load_pem_x509_certificate(revoked[0].read_bytes()).serial_number
    crl = write_crl(pki, [serial])
    return TlsMaterial(pki=pki, crl=crl, revoked=revoked)


NativeFactory = Callable[..., Awaitable[NativeHarness]]


async def start_native(
    pg_dsn: str, clock: ManualClock, tls_material: TlsMaterial, **overrides: Any
) -> NativeHarness:
    """A started NativeServer on ``pg_dsn``; ``overrides`` go to ``ListenerSettings``
    (plus ``min_tls`` for the server's TLS context; ``authenticator``/``authorizer``, which
    default to certificate identity and allow-all; and ``envelope``, a callable
    ``store -> Envelope`` for encryption at rest, default none; and ``tracer``, an OpenTelemetry
    tracer for the broker's own spans, default none; and ``audit``: the audit trail is on, as in
    ``serve``, with a fresh signing key or the ``SigningKey`` given, unless ``audit=False``).
    Stop it with ``stop_native``."""
    pki = tls_material.pki
    authenticator: Authenticator = (
        overrides.pop("authenticator", None) or CertificateAuthenticator()
    )
    authorizer: Authorizer = overrides.pop("authorizer", None) or AllowAll()
    tracer = overrides.pop("tracer", None)
    audit_key = overrides.pop("audit", None)
    # Group commit, as the broker runs by default (the contract suite covers the plain store).
    store: PostgresStore = await GroupCommitStore.connect_group(pg_dsn, min_size=1, max_size=20)
    try:
        make_envelope = overrides.pop("envelope", None)
        audit: AuditLog | None = None
        if audit_key is not False:
            audit = AuditLog(
                store.pool,
                signer=audit_key if isinstance(audit_key, SigningKey) else SigningKey.generate(),
                clock=clock,
                checkpoint_interval=3600,
            )
            await audit.start()
            store.audit = audit
        broker = Broker(
            store,
            fingerprint_key=FP_KEY,
            clock=clock,
            rng=random.Random(7),
            envelope=None if make_envelope is None else make_envelope(store),
        )
        ctx = make_server_context(
            cert=pki.server_cert,
            key=pki.server_key,
            ca=pki.ca_cert,
            crl=tls_material.crl,
            min_version=overrides.pop("min_tls", "1.3"),
        )
        settings = ListenerSettings(
            **{"ssl_context": ctx, "host": "127.0.0.1", "port": 0, "handshake_timeout": IO_TIMEOUT}
            | overrides
        )
        server = NativeServer(
            broker,
            settings,
            authenticator=authenticator,
            authorizer=authorizer,
            admin=AdminService(broker, authorizer, None if audit is None else AuditService(audit)),
            tracer=tracer,
        )
        harness = NativeHarness(server, broker, store, clock, tls_material, audit)
        server.on_refused = harness._on_refused
        server.on_denied = harness._on_denied
        if audit is not None:
            server.on_audit = audit.record
        await server.start()
    except BaseException:
        if store.audit is not None:
            await store.audit.close()
        await store.close()
        raise
    return harness


async def stop_native(h: NativeHarness) -> None:
    """Close the harness's clients, then the server (gracefully), then its pool."""
    try:
        for c in h.clients:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(IO_TIMEOUT):
                    await c.close()
        async with asyncio.timeout(IO_TIMEOUT * 2):
            await h.server.close(grace=IO_TIMEOUT)
        if h.audit is not None:
            await h.audit.close()
    finally:
        await h.store.close()


@pytest.fixture
async def native_factory(
    pg_dsn: str, clock: ManualClock, tls_material: TlsMaterial
) -> AsyncIterator[NativeFactory]:
    """Start NativeServers (settings overridable) on the test database; stopped at teardown."""
    harnesses: list[NativeHarness] = []

    async def start(**overrides: Any) -> NativeHarness:
        harness = await start_native(pg_dsn, clock, tls_material, **overrides)
        harnesses.append(harness)
        return harness

    try:
        yield start
    finally:
        for h in harnesses:
            await stop_native(h)


@pytest.fixture
async def native(native_factory: NativeFactory) -> NativeHarness:
    return await native_factory()


async def make_queue(h: NativeHarness, topic: str, subscription: str, **settings: Any) -> None:
    await h.broker.create_topic(topic)
    await h.broker.create_subscription(subscription, topic, **settings)


def new_key() -> str:
    return f"k-{uuid.uuid4().hex}"
