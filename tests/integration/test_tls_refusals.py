"""Mutual-TLS refusals against a real TLS listener on loopback.

The server under test is the single ``tls_echo_server`` fixture: an ``asyncio.start_server``
listener that upgrades each connection with ``server_context(...)``, replies with the peer's
principal and closes. To run these cases against the broker's listener instead, replace that
fixture with one yielding an object with the same shape (``host``, ``port`` and an async
``next_outcome()`` reporting the server's view of each handshake).

What the client sees when it is refused: asyncio's TLS implementation drops the connection on a
failed server handshake without flushing the TLS alert, so a refused client gets EOF or a
connection reset rather than an alert. With TLS 1.3 the client's own handshake completes before
the server has checked the client certificate, so a refused certificate only shows on the client's
first read. Every refusal is therefore also checked on the server side (``next_outcome``), with
the reason the server gave, so no case can pass just because the connection failed for some
unrelated reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from tls_helpers import (
    close_quietly,
    expired_client,
    foreign_ca_client,
    no_certificate_client,
    revoked_client,
    send_plaintext,
)

from securebroker.tls import (
    DevPki,
    client_context,
    ensure_dev_pki,
    identity_from_ssl_object,
    issue_client_cert,
    server_context,
    write_crl,
)

#: Upper bound for every network wait; generous because it only matters when something hangs.
IO_TIMEOUT = 10.0


@dataclass(frozen=True)
class TlsMaterial:
    pki: DevPki
    crl: Path
    revoked: tuple[Path, Path]


@dataclass(frozen=True)
class HandshakeOutcome:
    """The server's view of one connection: the accepted principal, or why it was refused."""

    principal: str | None
    #: Lower-case reason for a refusal (OpenSSL reason or verification message), else "".
    reason: str = ""


@dataclass
class TlsServer:
    host: str
    port: int
    outcomes: asyncio.Queue[HandshakeOutcome] = field(default_factory=asyncio.Queue)

    async def next_outcome(self) -> HandshakeOutcome:
        async with asyncio.timeout(IO_TIMEOUT):
            return await self.outcomes.get()


@pytest.fixture
def tls_material(tmp_path: Path) -> TlsMaterial:
    pki = ensure_dev_pki(tmp_path / "pki")
    revoked = issue_client_cert(pki, "revoked-client")
    serial = x509.load_pem_x509_certificate(revoked[0].read_bytes()).serial_number
    crl = write_crl(pki, [serial])
    return TlsMaterial(pki=pki, crl=crl, revoked=revoked)


def _refusal_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return exc.verify_message.lower()
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return f"{type(exc).__name__}: {exc}".lower()


@pytest.fixture
async def tls_echo_server(tls_material: TlsMaterial) -> AsyncIterator[TlsServer]:
    """THE server under test: mTLS (TLS 1.3 minimum, CRL checked), replies with the principal."""
    pki = tls_material.pki
    ctx = server_context(
        cert=pki.server_cert, key=pki.server_key, ca=pki.ca_cert, crl=tls_material.crl
    )
    outcomes: asyncio.Queue[HandshakeOutcome] = asyncio.Queue()
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        outcome = HandshakeOutcome(principal=None, reason="no outcome")
        try:
            try:
                # TCP accept first, then the handshake: the failure is ours to record.
                await writer.start_tls(ctx, ssl_handshake_timeout=IO_TIMEOUT)
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                outcome = HandshakeOutcome(principal=None, reason=_refusal_reason(exc))
                return
            identity = identity_from_ssl_object(writer.get_extra_info("ssl_object"))
            outcome = HandshakeOutcome(principal=identity.principal)
            writer.write(identity.principal.encode())
            await writer.drain()
        finally:
            writer.close()
            # After a failed handshake wait_closed re-raises the handshake error.
            with contextlib.suppress(ssl.SSLError, OSError):
                await writer.wait_closed()
            outcomes.put_nowait(outcome)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield TlsServer(host="127.0.0.1", port=port, outcomes=outcomes)
    finally:
        server.close()
        await server.wait_closed()
        if handlers:
            async with asyncio.timeout(IO_TIMEOUT):
                await asyncio.gather(*handlers, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# client helpers


async def _read_all(server: TlsServer, ctx: ssl.SSLContext) -> bytes | BaseException:
    """Connect over TLS and read until EOF; a read error is returned, not raised."""
    async with asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_connection(server.host, server.port, ssl=ctx)
        try:
            return await reader.read()
        except (ssl.SSLError, ConnectionResetError) as exc:
            return exc
        finally:
            await close_quietly(writer)


async def _connect_and_close(server: TlsServer, ctx: ssl.SSLContext) -> None:
    async with asyncio.timeout(IO_TIMEOUT):
        _reader, writer = await asyncio.open_connection(server.host, server.port, ssl=ctx)
        await close_quietly(writer)


async def _assert_refused_after_handshake(
    server: TlsServer, ctx: ssl.SSLContext, server_reason: str
) -> None:
    """The client's handshake may complete (TLS 1.3), but it never gets application data."""
    result = await _read_all(server, ctx)
    assert result == b"" or isinstance(result, ssl.SSLError | ConnectionResetError), result
    outcome = await server.next_outcome()
    assert outcome.principal is None
    assert server_reason in outcome.reason


def _client(material: TlsMaterial, name: str = "dev-client") -> ssl.SSLContext:
    cert, key = material.pki.clients[name]
    return client_context(cert=cert, key=key, ca=material.pki.ca_cert)


# --------------------------------------------------------------------------------------------
# cases


async def test_valid_client_certificate_is_accepted(
    tls_echo_server: TlsServer, tls_material: TlsMaterial
) -> None:
    result = await _read_all(tls_echo_server, _client(tls_material))
    assert result == b"spiffe://securebroker.dev/dev-client"
    outcome = await tls_echo_server.next_outcome()
    assert outcome.principal == "spiffe://securebroker.dev/dev-client"


async def test_client_without_certificate_is_refused(
    tls_echo_server: TlsServer, tls_material: TlsMaterial
) -> None:
    ctx = no_certificate_client(tls_material.pki)
    await _assert_refused_after_handshake(tls_echo_server, ctx, "peer did not return a certificate")


async def test_certificate_from_another_ca_is_refused(
    tls_echo_server: TlsServer, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    ctx = foreign_ca_client(tls_material.pki, tmp_path)
    await _assert_refused_after_handshake(tls_echo_server, ctx, "unable to get local issuer")


async def test_expired_client_certificate_is_refused(
    tls_echo_server: TlsServer, tls_material: TlsMaterial
) -> None:
    ctx = expired_client(tls_material.pki)
    await _assert_refused_after_handshake(tls_echo_server, ctx, "certificate has expired")


async def test_revoked_client_certificate_is_refused(
    tls_echo_server: TlsServer, tls_material: TlsMaterial
) -> None:
    ctx = revoked_client(tls_material.pki, tls_material.revoked)
    await _assert_refused_after_handshake(tls_echo_server, ctx, "certificate revoked")


async def test_unrevoked_certificate_from_same_ca_still_accepted_with_crl(
    tls_echo_server: TlsServer, tls_material: TlsMaterial
) -> None:
    """Guards the revocation case: the CRL is loaded and only the listed serial is refused."""
    result = await _read_all(tls_echo_server, _client(tls_material, "dev-admin"))
    assert result == b"spiffe://securebroker.dev/dev-admin"
    assert (await tls_echo_server.next_outcome()).principal == "spiffe://securebroker.dev/dev-admin"


async def test_plaintext_client_gets_no_data(tls_echo_server: TlsServer) -> None:
    http = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    async with asyncio.timeout(IO_TIMEOUT):
        data = await send_plaintext(tls_echo_server.host, tls_echo_server.port, http)
    assert data == b""
    outcome = await tls_echo_server.next_outcome()
    assert outcome.principal is None
    assert "http request" in outcome.reason


async def test_tls12_client_is_refused_when_minimum_is_13(
    tls_echo_server: TlsServer, tls_material: TlsMaterial
) -> None:
    cert, key = tls_material.pki.clients["dev-client"]
    ctx = client_context(
        cert=cert, key=key, ca=tls_material.pki.ca_cert, min_version="1.2", max_version="1.2"
    )
    # With TLS 1.2 the refusal happens during the client's handshake.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await _connect_and_close(tls_echo_server, ctx)
    outcome = await tls_echo_server.next_outcome()
    assert outcome.principal is None
    assert "unsupported protocol" in outcome.reason
