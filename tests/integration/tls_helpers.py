"""Client sides of the mutual-TLS refusal cases, shared by ``test_tls_refusals.py`` (a stand-in
TLS listener) and ``test_native_refusals.py`` (the broker's own listener).

Each ``*_client`` builds the context of a client the server must refuse; all of them trust the
server's CA (``pki.ca_cert``), so the only thing wrong is the client's own certificate.
``send_plaintext`` is a client that skips TLS altogether. Imported by module name: pytest puts
this directory on ``sys.path`` (the test directories have no ``__init__.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme

from securebroker.tls import DevPki, client_context, issue_client_cert


def no_certificate_client(pki: DevPki) -> ssl.SSLContext:
    """A client that presents no certificate."""
    return client_context(cert=None, key=None, ca=pki.ca_cert)


def foreign_ca_client(pki: DevPki, tmp_path: Path) -> ssl.SSLContext:
    """A client whose certificate comes from a CA the server does not know (files in tmp_path)."""
    foreign = trustme.CA().issue_cert("foreign-client")
    cert, key = tmp_path / "foreign.pem", tmp_path / "foreign.key"
    foreign.cert_chain_pems[0].write_to_path(str(cert))
    foreign.private_key_pem.write_to_path(str(key))
    return client_context(cert=cert, key=key, ca=pki.ca_cert)


def expired_client(pki: DevPki) -> ssl.SSLContext:
    """A client whose certificate from the server's CA expired yesterday."""
    now = datetime.now(UTC)
    cert, key = issue_client_cert(
        pki,
        "expired-client",
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    return client_context(cert=cert, key=key, ca=pki.ca_cert)


def revoked_client(pki: DevPki, revoked: tuple[Path, Path]) -> ssl.SSLContext:
    """A client presenting ``revoked`` (cert, key): from the server's CA, listed in its CRL."""
    cert, key = revoked
    return client_context(cert=cert, key=key, ca=pki.ca_cert)


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``; after a refused handshake ``wait_closed`` re-raises the error: ignored."""
    writer.close()
    with contextlib.suppress(ssl.SSLError, OSError):
        await writer.wait_closed()


async def send_plaintext(host: str, port: int, data: bytes) -> bytes:
    """Connect without TLS, send ``data`` and read until EOF; a reset reads as EOF (``b""``).

    No timeout of its own: the caller bounds it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""
    finally:
        await close_quietly(writer)
