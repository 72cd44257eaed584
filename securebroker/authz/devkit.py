"""Development token issuer: a signing key, its JWKS and a dev policy, made by ``securebroker dev``.

Production tokens come from your identity provider; the broker only needs its JWKS. For
development, ``securebroker dev`` plays the identity provider: an Ed25519 key in
``certs-dev/jwt-signing.key`` (mode 0600, never committed), its public JWKS in
``certs-dev/jwks.json``, and a policy granting the dev identities what the quick start needs.
The CLI mints short-lived, certificate-bound tokens from that key when it finds it next to the
client certificate, so the first publish needs no token handling at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from securebroker.authz.tokens import mint_token
from securebroker.errors import ConfigError
from securebroker.secrets import check_private, write_private
from securebroker.tls import peer_identity

DEV_ISSUER = "securebroker-dev"
DEV_AUDIENCE = "securebroker"
SIGNING_KEY = "jwt-signing.key"
JWKS = "jwks.json"
DEV_POLICY = """\
# Development policy, written by `securebroker dev`. Deny by default; these rules grant the two
# dev identities what the quick start needs. Production policies live in your own directory.
version = 1

[[rules]]
id = "dev-client-messaging"
description = "the dev client publishes to and consumes from every topic"
actions = ["publish", "consume"]
topics = ["#"]
subjects = ["dev-client"]

[[rules]]
id = "dev-admin-everything"
description = "the dev admin administers, publishes, consumes and audits everything"
actions = ["admin", "publish", "consume", "audit"]
topics = ["#"]
subjects = ["dev-admin"]
"""


@dataclass(frozen=True)
class DevAuth:
    signing_key: Path
    jwks: Path
    policy: Path
    kid: str


def jwk_thumbprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint of an Ed25519 public key: a stable ``kid``."""
    x = _b64(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return _b64(hashlib.sha256(canonical.encode()).digest())


def public_jwk(public_key: ed25519.Ed25519PublicKey, kid: str | None = None) -> dict[str, str]:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64(raw),
        "kid": kid or jwk_thumbprint(public_key),
        "use": "sig",
        "alg": "EdDSA",
    }


def ensure_dev_auth(certs: Path, home: Path) -> DevAuth:
    """Create (once) the dev signing key, its JWKS and the dev policy; keep existing ones."""
    key_path = certs / SIGNING_KEY
    if not key_path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    private = load_signing_key(key_path)
    jwk = public_jwk(private.public_key())
    jwks_path = certs / JWKS
    jwks_path.write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n", encoding="utf-8")
    policy_path = home / "policy" / "dev.toml"
    policy_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not policy_path.exists():
        policy_path.write_text(DEV_POLICY, encoding="utf-8")
    return DevAuth(key_path, jwks_path, policy_path, jwk["kid"])


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    check_private(path, setting="signing key", hint=" (run `securebroker dev` first)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise ConfigError(f"signing key {path} is not a PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} must be an Ed25519 key")
    return key


def mint_dev_token(
    signing_key: Path,
    *,
    subject: str,
    lifetime: timedelta = timedelta(minutes=15),
    roles: tuple[str, ...] = (),
    tenant: str | None = None,
    bind_cert: Path | None = None,
    issuer: str = DEV_ISSUER,
    audience: str = DEV_AUDIENCE,
) -> str:
    key = load_signing_key(signing_key)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return mint_token(
        pem,
        kid=jwk_thumbprint(key.public_key()),
        subject=subject,
        issuer=issuer,
        audience=audience,
        lifetime=lifetime,
        roles=roles,
        tenant=tenant,
        bind_thumbprint=None if bind_cert is None else cert_thumbprint(bind_cert),
    )


def cert_identity(cert_path: Path) -> tuple[str, str]:
    """``(common name, x5t#S256)`` of a PEM certificate file."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        raise ConfigError(f"{cert_path}: not a readable PEM certificate") from None
    ident = peer_identity(cert.public_bytes(serialization.Encoding.DER))
    return (ident.common_name or ident.principal, ident.thumbprint_s256)


def cert_thumbprint(cert_path: Path) -> str:
    return cert_identity(cert_path)[1]


def dev_token_for(cert_path: Path, lifetime: timedelta = timedelta(minutes=15)) -> str | None:
    """A token for the dev identity of ``cert_path`` (its CN), bound to it, when the dev signing
    key sits next to it; None otherwise (then the caller passes ``--token``)."""
    key = cert_path.parent / SIGNING_KEY
    if not key.exists():
        return None
    subject, _ = cert_identity(cert_path)
    return mint_dev_token(key, subject=subject, lifetime=lifetime, bind_cert=cert_path)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
