"""``ssl.SSLContext`` factories for mutual TLS, and the peer identity of an established session.

Every listener requires and verifies a client certificate (``CERT_REQUIRED``) against the
configured CA bundle, optionally checks the leaf against a CRL, and speaks TLS 1.3 unless 1.2 is
explicitly allowed (then only forward-secret AEAD suites). Configuration problems raise
``ConfigError`` with a one-line message naming the offending file; key material never appears
in messages.

Note for callers: with TLS 1.3 the client finishes its handshake before the server has checked
the client certificate, so a refused client certificate surfaces on the client's first read
(an ``ssl.SSLError`` carrying the server's alert, ``ConnectionResetError`` or EOF), not in the
client's handshake.
"""

from __future__ import annotations

import re
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NoReturn

from cryptography import x509

from securebroker.errors import AuthenticationError, ConfigError
from securebroker.tls.pki import PeerIdentity, peer_identity

__all__ = ["TlsVersionName", "client_context", "identity_from_ssl_object", "server_context"]

TlsVersionName = Literal["1.2", "1.3"]

_VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

#: TLS 1.2 only (1.3 suites are not affected by set_ciphers): ECDHE key exchange, AEAD ciphers.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS"

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
_PEM_CERT = re.compile(rb"-----BEGIN (?:TRUSTED )?CERTIFICATE-----")


def server_context(
    *,
    cert: Path,
    key: Path,
    ca: Path,
    crl: Path | None = None,
    min_version: TlsVersionName = "1.3",
) -> ssl.SSLContext:
    """A server context that requires a client certificate chaining to ``ca``.

    With ``crl`` the client's leaf certificate is also checked against that PEM CRL
    (``VERIFY_CRL_CHECK_LEAF``); an expired CRL is refused here rather than failing every
    handshake later. Session tickets are disabled, so every connection runs a full handshake and
    certificate check.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _version(min_version, "min_version")
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, cert, key)
    _load_ca(ctx, ca)
    if crl is not None:
        _load_crl(ctx, crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(
    *,
    cert: Path | None,
    key: Path | None,
    ca: Path,
    min_version: TlsVersionName = "1.3",
    max_version: TlsVersionName | None = None,
) -> ssl.SSLContext:
    """A client context verifying the server against ``ca`` (hostname checked).

    ``cert``/``key`` is the client certificate; ``key`` may be None when ``cert`` holds both.
    With neither, the client presents no certificate (which a securebroker server refuses).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = _version(min_version, "min_version")
    if max_version is not None:
        ctx.maximum_version = _version(max_version, "max_version")
        if _VERSIONS[max_version] < _VERSIONS[min_version]:
            raise ConfigError(f"TLS max_version {max_version} is below min_version {min_version}")
    _harden(ctx)
    _load_ca(ctx, ca)
    if cert is not None:
        _load_chain(ctx, cert, key)
    elif key is not None:
        raise ConfigError(f"TLS client key {key} given without a certificate")
    return ctx


def identity_from_ssl_object(obj: ssl.SSLObject | ssl.SSLSocket) -> PeerIdentity:
    """The peer's identity from an established TLS session (e.g. ``writer.get_extra_info(
    "ssl_object")``). Raises ``AuthenticationError`` when the peer presented no certificate."""
    der = obj.getpeercert(binary_form=True)
    if not der:
        raise AuthenticationError("peer presented no certificate")
    return peer_identity(der)


# --------------------------------------------------------------------------------------------


def _version(value: str, what: str) -> ssl.TLSVersion:
    try:
        return _VERSIONS[value]
    except KeyError:
        raise ConfigError(f"TLS {what} must be '1.2' or '1.3', not {value!r}") from None


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(TLS12_CIPHERS)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _check_readable(path: Path, what: str) -> None:
    try:
        with Path(path).open("rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(f"TLS {what} file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"TLS {what} path is a directory, not a file: {path}") from None
    except PermissionError:
        raise ConfigError(f"TLS {what} file is not readable (permission denied): {path}") from None
    except OSError as exc:
        raise ConfigError(f"TLS {what} file cannot be read ({_reason(exc)}): {path}") from None


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    _check_readable(cert, "certificate")
    if key is not None:
        _check_readable(key, "private key")

    def no_password() -> NoReturn:
        raise ConfigError(f"TLS private key {key or cert} is encrypted; provide an unencrypted key")

    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except (ssl.SSLError, OSError) as exc:
        files = f"{cert}" if key is None else f"{cert} with key {key}"
        raise ConfigError(
            f"TLS certificate/key could not be loaded ({_reason(exc)}): {files}"
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    _check_readable(ca, "CA bundle")
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS CA bundle could not be loaded ({_reason(exc)}): {ca}") from None


def _load_crl(ctx: ssl.SSLContext, crl: Path) -> None:
    """Load a PEM CRL file, refusing files that would also add trust anchors or are expired."""
    _check_readable(crl, "CRL")
    try:
        data = Path(crl).read_bytes()
    except OSError as exc:
        raise ConfigError(f"TLS CRL file cannot be read ({_reason(exc)}): {crl}") from None
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise ConfigError(f"TLS CRL file holds no PEM 'X509 CRL' block: {crl}")
    if _PEM_CERT.search(data):
        # load_verify_locations would trust any certificate found in the file.
        raise ConfigError(f"TLS CRL file must not contain certificates: {crl}")
    now = datetime.now(UTC)
    for block in blocks:
        try:
            parsed = x509.load_pem_x509_crl(block)
        except ValueError:
            raise ConfigError(f"TLS CRL file holds a malformed CRL: {crl}") from None
        next_update = parsed.next_update_utc
        if next_update is not None and next_update <= now:
            raise ConfigError(
                f"TLS CRL expired at {next_update.isoformat()} (every client would be refused): "
                f"{crl}"
            )
    try:
        ctx.load_verify_locations(cafile=crl)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS CRL could not be loaded ({_reason(exc)}): {crl}") from None
