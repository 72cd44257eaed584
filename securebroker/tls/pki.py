"""Development PKI and peer identities, built with ``cryptography``'s x509 API only.

``ensure_dev_pki`` keeps a self-contained CA, a server certificate and client certificates in one
directory, regenerating only what is missing, expiring or no longer chained to the current CA, so
it is safe to call on every start. It is for development and tests: production deployments bring
their own CA and point the broker at its files.

``peer_identity`` turns the DER certificate a TLS peer presented into the transport identity the
rest of the broker works with (principal, SANs and the RFC 8705 ``x5t#S256`` thumbprint used for
certificate-bound tokens).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securebroker.errors import AuthenticationError, ConfigError

__all__ = [
    "SPIFFE_TRUST_DOMAIN",
    "DevPki",
    "PeerIdentity",
    "ensure_dev_pki",
    "issue_client_cert",
    "peer_identity",
    "write_crl",
]

#: Trust domain of the SPIFFE IDs put in development client certificates.
SPIFFE_TRUST_DOMAIN = "securebroker.dev"

CA_VALIDITY = timedelta(days=3650)
LEAF_VALIDITY = timedelta(days=365)
CRL_VALIDITY = timedelta(days=7)
#: The CA (and with it everything it signed) is replaced when it has less than this left.
CA_RENEW_BEFORE = timedelta(days=30)
#: A leaf certificate is replaced when it has less than this left.
LEAF_RENEW_BEFORE = timedelta(days=7)
#: ``ensure_dev_pki`` re-signs an existing CRL when it has less than this left.
CRL_RENEW_BEFORE = timedelta(days=1)
#: Certificates start slightly in the past so peers with a skewed clock accept them.
CLOCK_SKEW = timedelta(minutes=5)

_CA_COMMON_NAME = "securebroker development CA"
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESERVED_NAMES = frozenset({"ca", "server", "crl"})


@dataclass(frozen=True)
class DevPki:
    """Paths of the development PKI files (all inside one directory)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    #: client name -> (certificate, private key)
    clients: dict[str, tuple[Path, Path]] = field(hash=False)
    crl: Path | None = None

    @property
    def directory(self) -> Path:
        return self.ca_cert.parent


@dataclass(frozen=True)
class PeerIdentity:
    """The transport identity of a TLS peer, taken from its certificate."""

    #: RFC 4514 string of the subject, e.g. ``CN=dev-client``.
    subject: str
    common_name: str | None
    #: Subject alternative names as ``dns:...``, ``uri:...``, ``ip:...``, ``email:...``.
    sans: tuple[str, ...]
    #: First URI SAN (a SPIFFE ID for dev certificates), else the CN, else the subject.
    principal: str
    #: RFC 8705 ``x5t#S256``: base64url (no padding) SHA-256 of the certificate's DER.
    thumbprint_s256: str
    not_after: datetime


# --------------------------------------------------------------------------------------------
# public API


def ensure_dev_pki(
    directory: Path,
    *,
    now: datetime | None = None,
    server_names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    clients: Sequence[str] = ("dev-client", "dev-admin"),
) -> DevPki:
    """Create or refresh the development PKI under ``directory`` and return its paths.

    Regenerates the CA and everything it signed when the CA is missing, unreadable or has less
    than 30 days left; regenerates a leaf when it is missing, unreadable, does not match its key,
    has less than 7 days left, is not signed by the current CA or (server) does not carry exactly
    ``server_names``. Anything still good is left untouched, so a second call writes nothing.
    An existing ``crl.pem`` is re-signed when it expires within a day, and reset to an empty list
    when the CA was replaced (the old serials mean nothing under a new CA).
    """
    now = _aware(now)
    if not server_names:
        raise ConfigError("ensure_dev_pki: server_names must not be empty")
    for name in clients:
        _check_client_name(name)
    if len(set(clients)) != len(clients):
        raise ConfigError("ensure_dev_pki: client names must be unique")

    directory = Path(directory)
    _ensure_private_dir(directory)

    ca_cert_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    ca = _load_pair(ca_cert_path, ca_key_path)
    ca_replaced = ca is None or not _currently_valid(ca[0], now, CA_RENEW_BEFORE)
    if ca is None or ca_replaced:
        ca = _new_ca(now)
        _write_pair(ca_cert_path, ca_key_path, ca[0], ca[1])
    ca_cert, ca_key = ca

    server_cert_path, server_key_path = directory / "server.pem", directory / "server.key"
    wanted_sans = _server_sans(server_names)
    server = _load_pair(server_cert_path, server_key_path)
    if (
        ca_replaced
        or server is None
        or not _leaf_ok(server[0], ca_cert, now)
        or set(_san_names(server[0])) != {_format_general_name(n) for n in wanted_sans}
    ):
        cert, key = _new_server_cert(ca_cert, ca_key, wanted_sans, server_names[0], now)
        _write_pair(server_cert_path, server_key_path, cert, key)

    client_paths: dict[str, tuple[Path, Path]] = {}
    for name in clients:
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        existing = _load_pair(cert_path, key_path)
        if ca_replaced or existing is None or not _leaf_ok(existing[0], ca_cert, now):
            cert, key = _new_client_cert(
                ca_cert, ca_key, name, now - CLOCK_SKEW, now + LEAF_VALIDITY
            )
            _write_pair(cert_path, key_path, cert, key)
        client_paths[name] = (cert_path, key_path)

    crl_path = directory / "crl.pem"
    crl: Path | None = None
    if crl_path.exists():
        _refresh_crl(crl_path, ca_cert, ca_key, now, reset=ca_replaced)
        crl = crl_path

    return DevPki(
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        server_cert=server_cert_path,
        server_key=server_key_path,
        clients=client_paths,
        crl=crl,
    )


def issue_client_cert(
    pki: DevPki,
    name: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue (or replace) the client certificate ``<name>.pem``/``<name>.key`` in the PKI directory.

    Validity defaults to now-5min .. now+1y; pass both bounds to get e.g. an expired certificate.
    """
    _check_client_name(name)
    now = datetime.now(UTC)
    start = _aware(not_before) if not_before is not None else now - CLOCK_SKEW
    end = _aware(not_after) if not_after is not None else now + LEAF_VALIDITY
    if end <= start:
        raise ConfigError(
            f"issue_client_cert: not_after ({end}) must be after not_before ({start})"
        )
    ca_cert, ca_key = _require_ca(pki)
    cert, key = _new_client_cert(ca_cert, ca_key, name, start, end)
    cert_path, key_path = pki.directory / f"{name}.pem", pki.directory / f"{name}.key"
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def write_crl(pki: DevPki, revoked_serials: Iterable[int], path: Path | None = None) -> Path:
    """Write a PEM CRL signed by the dev CA revoking ``revoked_serials`` (next update in 7 days).

    Defaults to ``crl.pem`` in the PKI directory. The CRL number increases on every write.
    """
    ca_cert, ca_key = _require_ca(pki)
    target = Path(path) if path is not None else pki.directory / "crl.pem"
    number = 1
    previous = _load_crl(target)
    if previous is not None:
        with contextlib.suppress(x509.ExtensionNotFound):
            number = (
                previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
            )
    crl = _build_crl(ca_cert, ca_key, revoked_serials, datetime.now(UTC), number)
    _atomic_write(target, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return target


def peer_identity(cert_der: bytes) -> PeerIdentity:
    """Extract the transport identity from a DER certificate (as ``getpeercert(True)`` returns).

    Raises ``AuthenticationError`` when the certificate cannot be parsed.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        sans = _san_names(cert)
        subject = cert.subject.rfc4514_string()
        not_after = cert.not_valid_after_utc
    except ValueError as exc:
        raise AuthenticationError("peer certificate could not be parsed") from exc
    cn_attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name: str | None = None
    if cn_attrs:
        value = cn_attrs[0].value
        common_name = value if isinstance(value, str) else value.decode("utf-8", "replace")
    uris = [s.removeprefix("uri:") for s in sans if s.startswith("uri:")]
    principal = uris[0] if uris else (common_name or subject)
    return PeerIdentity(
        subject=subject,
        common_name=common_name,
        sans=sans,
        principal=principal,
        thumbprint_s256=_thumbprint_s256(cert_der),
        not_after=not_after,
    )


# --------------------------------------------------------------------------------------------
# certificate construction


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _new_ca(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "securebroker"),
            x509.NameAttribute(NameOID.COMMON_NAME, _CA_COMMON_NAME),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_builder(
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    *,
    sans: Sequence[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )


def _new_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: Sequence[x509.GeneralName],
    common_name: str,
    now: datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _leaf_builder(
        ca_cert,
        key,
        subject,
        sans=sans,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=now - CLOCK_SKEW,
        not_after=now + LEAF_VALIDITY,
    )
    return builder.sign(ca_key, hashes.SHA256()), key


def _new_client_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    not_before: datetime,
    not_after: datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    sans = [x509.UniformResourceIdentifier(f"spiffe://{SPIFFE_TRUST_DOMAIN}/{name}")]
    builder = _leaf_builder(
        ca_cert,
        key,
        subject,
        sans=sans,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=not_before,
        not_after=not_after,
    )
    return builder.sign(ca_key, hashes.SHA256()), key


def _server_sans(server_names: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for name in server_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name:
                raise ConfigError("ensure_dev_pki: empty server name") from None
            sans.append(x509.DNSName(name))
    return sans


def _build_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked_serials: Iterable[int],
    now: datetime,
    number: int,
) -> x509.CertificateRevocationList:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now - CLOCK_SKEW + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - CLOCK_SKEW)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def _refresh_crl(
    path: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    *,
    reset: bool,
) -> None:
    crl = _load_crl(path)
    signed_by_ca = crl is not None and _crl_signed_by(crl, ca_cert)
    if not reset and crl is not None and signed_by_ca:
        next_update = crl.next_update_utc
        if next_update is not None and next_update - now >= CRL_RENEW_BEFORE:
            return
    serials: list[int] = []
    number = 1
    if not reset and crl is not None and signed_by_ca:
        serials = [r.serial_number for r in crl]
        with contextlib.suppress(x509.ExtensionNotFound):
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    new = _build_crl(ca_cert, ca_key, serials, now, number)
    _atomic_write(path, new.public_bytes(serialization.Encoding.PEM), 0o644)


# --------------------------------------------------------------------------------------------
# checks


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    return value.astimezone(UTC)


def _check_client_name(name: str) -> None:
    if not _CLIENT_NAME.fullmatch(name) or name.lower() in _RESERVED_NAMES:
        raise ConfigError(
            f"invalid client name {name!r}: use 1-64 of [A-Za-z0-9._-], starting with a letter "
            "or digit, and not ca/server/crl"
        )


def _currently_valid(cert: x509.Certificate, now: datetime, renew_before: timedelta) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now >= renew_before


def _leaf_ok(cert: x509.Certificate, ca_cert: x509.Certificate, now: datetime) -> bool:
    if not _currently_valid(cert, now, LEAF_RENEW_BEFORE):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _crl_signed_by(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate) -> bool:
    public_key = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    return crl.is_signature_valid(public_key)


def _san_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    formatted = (_format_general_name(general_name) for general_name in ext.value)
    return tuple(name for name in formatted if name is not None)


def _format_general_name(general_name: x509.GeneralName) -> str | None:
    """``dns:``/``uri:``/``ip:``/``email:`` form of a SAN entry; None for other kinds."""
    if isinstance(general_name, x509.DNSName):
        return f"dns:{general_name.value}"
    if isinstance(general_name, x509.UniformResourceIdentifier):
        return f"uri:{general_name.value}"
    if isinstance(general_name, x509.IPAddress):
        return f"ip:{general_name.value}"
    if isinstance(general_name, x509.RFC822Name):
        return f"email:{general_name.value}"
    return None


def _thumbprint_s256(cert_der: bytes) -> str:
    digest = hashlib.sha256(cert_der).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# --------------------------------------------------------------------------------------------
# files


def _ensure_private_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask


def _load_pair(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Load a certificate and its key; None when missing, unreadable, not EC or not matching."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return None
    _tighten_key_mode(key_path)
    return cert, key


def _require_ca(pki: DevPki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = _load_pair(pki.ca_cert, pki.ca_key)
    if ca is None:
        raise ConfigError(f"dev CA not usable: {pki.ca_cert} / {pki.ca_key} (run ensure_dev_pki)")
    return ca


def _load_crl(path: Path) -> x509.CertificateRevocationList | None:
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return None


def _tighten_key_mode(key_path: Path) -> None:
    """A key file readable by group/others is narrowed to 0600 (content and mtime unchanged)."""
    with contextlib.suppress(OSError):
        if key_path.stat().st_mode & 0o077:
            os.chmod(key_path, 0o600)


def _write_pair(
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> None:
    # Key first: a crash between the two writes leaves a mismatched pair, which the next
    # ensure_dev_pki detects and regenerates.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(key_path, key_pem, 0o600)
    _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
