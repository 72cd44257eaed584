"""Mutual-TLS refusals and connection limits against the real NativeServer.

The same six refusals as ``test_tls_refusals.py`` (which runs them against a stand-in echo
server), here against the broker's own listener. Each refused client tries to publish at once
(PREAMBLE + HELLO + PUBLISH right after its side of the handshake: with TLS 1.3 the client's
handshake completes before the server has checked its certificate), and each case checks three
things: the client got nothing back, the server reported the refusal with its reason through
``NativeServer.on_refused``, and nothing was published.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from native_fixtures import (
    ADMIN,
    ADMIN_PRINCIPAL,
    CLIENT,
    CLIENT_PRINCIPAL,
    IO_TIMEOUT,
    NativeFactory,
    NativeHarness,
    TlsMaterial,
    close_writer,
    make_queue,
    start_native,
    stop_native,
)
from tls_helpers import (
    expired_client,
    foreign_ca_client,
    no_certificate_client,
    revoked_client,
    send_plaintext,
)

from securebroker.clock import ManualClock
from securebroker.errors import AuthenticationError, ResourceExhausted, Unavailable
from securebroker.protocol import PREAMBLE, Hello, Publish, PublishItem, encode

TOPIC = "payments.authorize"
SUB = "payments.authorize.ledger"

ATTEMPT = (
    PREAMBLE
    + encode(Hello(client="refused"), 1)
    + encode(
        Publish(message=PublishItem(topic=TOPIC, payload=b"must not land", idempotency_key="x")), 2
    )
)


async def _try_publish_raw(h: NativeHarness, ctx: ssl.SSLContext) -> bytes | BaseException:
    """Connect, send HELLO and PUBLISH at once, read until EOF; a read error is returned."""
    async with asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_connection(h.host, h.port, ssl=ctx)
        try:
            writer.write(ATTEMPT)
            return await reader.read()
        except (ssl.SSLError, ConnectionError) as exc:
            return exc
        finally:
            await close_writer(writer)


async def _assert_refused(h: NativeHarness, ctx: ssl.SSLContext, reason: str) -> None:
    await make_queue(h, TOPIC, SUB)
    result = await _try_publish_raw(h, ctx)
    assert result == b"" or isinstance(result, ssl.SSLError | ConnectionError), result
    refusal = await h.wait_refusal(reason)
    assert refusal.startswith("tls handshake failed"), refusal
    # The SDK reports the refusal as an error, never as a session.
    with pytest.raises(AuthenticationError):
        await h.connect(ssl_context=ctx, reconnect=False)
    assert not h.server.connections
    assert await h.message_count() == 0
    assert (await h.counts(SUB)).ready == 0


async def test_valid_certificate_is_accepted_and_can_publish(native: NativeHarness) -> None:
    """Guards every refusal below: the same setup with a good certificate works."""
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    assert client.principal == CLIENT_PRINCIPAL
    await client.publish(TOPIC, b"fine", idempotency_key="ok")
    assert (await native.counts(SUB)).ready == 1
    assert native.refusals == []


async def test_client_without_certificate_is_refused(
    native: NativeHarness, tls_material: TlsMaterial
) -> None:
    ctx = no_certificate_client(tls_material.pki)
    await _assert_refused(native, ctx, "peer did not return a certificate")


async def test_certificate_from_another_ca_is_refused(
    native: NativeHarness, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    ctx = foreign_ca_client(tls_material.pki, tmp_path)
    await _assert_refused(native, ctx, "unable to get local issuer certificate")


async def test_expired_client_certificate_is_refused(
    native: NativeHarness, tls_material: TlsMaterial
) -> None:
    ctx = expired_client(tls_material.pki)
    await _assert_refused(native, ctx, "certificate has expired")


async def test_revoked_client_certificate_is_refused(
    native: NativeHarness, tls_material: TlsMaterial
) -> None:
    ctx = revoked_client(tls_material.pki, tls_material.revoked)
    await _assert_refused(native, ctx, "certificate revoked")


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "http request"),
        (ATTEMPT, "wrong version number"),  # the native protocol itself, without TLS
    ],
    ids=["http", "native-protocol"],
)
async def test_plaintext_client_is_refused(
    native: NativeHarness, first_bytes: bytes, reason: str
) -> None:
    await make_queue(native, TOPIC, SUB)
    async with asyncio.timeout(IO_TIMEOUT):
        data = await send_plaintext(native.host, native.port, first_bytes)
    assert data == b""
    refusal = await native.wait_refusal(reason)
    assert refusal.startswith("tls handshake failed"), refusal
    assert not native.server.connections
    assert await native.message_count() == 0


async def test_tls12_client_is_refused_when_minimum_is_13(
    native: NativeHarness, tls_material: TlsMaterial
) -> None:
    await make_queue(native, TOPIC, SUB)
    ctx = tls_material.client_context(CLIENT, min_version="1.2", max_version="1.2")
    # With TLS 1.2 the refusal happens during the client's own handshake.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await _try_publish_raw(native, ctx)
    refusal = await native.wait_refusal("unsupported protocol")
    assert refusal.startswith("tls handshake failed"), refusal
    with pytest.raises(Unavailable):
        await native.connect(ssl_context=ctx, reconnect=False)
    assert not native.server.connections
    assert await native.message_count() == 0


async def test_tls12_client_is_accepted_when_configured(
    native_factory: NativeFactory, tls_material: TlsMaterial
) -> None:
    """Guards the case above: the refusal is the configured minimum, not a broken client."""
    h = await native_factory(min_tls="1.2")
    ctx = tls_material.client_context(CLIENT, min_version="1.2", max_version="1.2")
    client = await h.connect(ssl_context=ctx)
    assert client.principal == CLIENT_PRINCIPAL


async def test_per_identity_connection_limit(native_factory: NativeFactory) -> None:
    h = await native_factory(max_connections_per_identity=2)
    await make_queue(h, TOPIC, SUB)
    first = await h.connect(reconnect=False)
    await h.connect(reconnect=False)
    with pytest.raises(ResourceExhausted, match="too many connections"):
        await h.connect(reconnect=False)
    await h.wait_refusal(f"per-identity connection limit for {CLIENT_PRINCIPAL}")
    assert len(h.server.connections) == 2

    # Another identity is not affected, and can work.
    other = await h.connect(ADMIN, reconnect=False)
    assert other.principal == ADMIN_PRINCIPAL
    await other.publish(TOPIC, b"from admin", idempotency_key="a-1")

    # A slot freed by a closed connection can be used again.
    conn = h.connection_of(first)
    await first.close()
    async with asyncio.timeout(IO_TIMEOUT):
        await conn.closed.wait()
    again = await h.connect(reconnect=False)
    await again.publish(TOPIC, b"from client", idempotency_key="c-1")
    assert (await h.counts(SUB)).ready == 2


async def test_overall_connection_limit(native_factory: NativeFactory) -> None:
    h = await native_factory(max_connections=2)
    await make_queue(h, TOPIC, SUB)
    first = await h.connect(CLIENT, reconnect=False)
    await h.connect(ADMIN, reconnect=False)
    # Refused before any TLS work: the client sees its handshake fail.
    with pytest.raises((Unavailable, AuthenticationError)):
        await h.connect("other-client", reconnect=False)
    await h.wait_refusal("connection limit reached")
    assert len(h.server.connections) == 2
    assert await h.message_count() == 0

    conn = h.connection_of(first)
    await first.close()
    async with asyncio.timeout(IO_TIMEOUT):
        await conn.closed.wait()
    third = await h.connect("other-client", reconnect=False)
    await third.publish(TOPIC, b"now there is room", idempotency_key="room")
    assert (await h.counts(SUB)).ready == 1


def test_handshakes_complete_under_uvloop(
    pg_dsn: str, clock: ManualClock, tls_material: TlsMaterial
) -> None:
    """The listener never reads a ClientHello as plaintext (which strands it: the handshake
    hangs). With uvloop, as ``securebroker dev``/``serve`` run, a client that sends its
    ClientHello at once is always read before a connection handler could start TLS."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[str]:
        h = await start_native(pg_dsn, clock, tls_material, handshake_timeout=5.0)
        try:
            principals = []
            for i in range(20):
                client = await h.connect(CLIENT if i % 2 else ADMIN, reconnect=False)
                principals.append(client.principal or "")
                await client.close()
            assert h.refusals == []
            return principals
        finally:
            await stop_native(h)

    principals = uvloop.run(scenario())
    assert principals == [ADMIN_PRINCIPAL, CLIENT_PRINCIPAL] * 10
