"""Bearer tokens and topic policies against the real ``NativeServer``: an issuer and a broker.

``issuer`` (a fixture) plays the identity provider in ``tmp_path``: signing keys ``k1``
(Ed25519, EdDSA) and ``k2`` (EC P-256, ES256) whose public halves it publishes in a JWKS file,
plus ``rogue`` (Ed25519), which is never published. ``Issuer.mint`` signs tokens with sensible
defaults (``iss`` ``https://issuer.test``, ``aud`` ``securebroker``, ``sub`` ``svc-orders``,
15 minutes, bound to the ``dev-client`` certificate) and can break any of them. The JWKS and the
policy are rewritten atomically (temporary file + ``os.replace``) with a strictly later mtime,
so the broker's ``stat`` checks always see the change (inode, mtime and size).

Test modules import the fixtures as ``issuer_fixture`` and ``auth_native_fixture``
(registered under the names ``issuer`` and ``auth_native``). ``auth_native`` is a factory:
``await auth_native(require_bound=..., require_token=..., leeway=..., **listener_overrides)``
starts a ``NativeServer`` (``native_factory``) with a ``JwtAuthenticator`` reading the
issuer's JWKS file and a ``PolicyAuthorizer`` over the issuer's policy directory, and returns
an ``AuthNative`` with everything a test needs to poke at.

The policy (``POLICY``) grants:

* subject ``svc-orders``: publish and consume on ``orders.#``;
* role ``auditor``: consume on ``payments.*`` only;
* role ``orders-admin``: admin on ``orders.#``;
* certificate ``spiffe://securebroker.dev/dev-admin`` (certificate only, no token needed):
  admin, publish and consume on ``payments.#`` and ``orders.internal.#``;

and denies publish on ``orders.internal.#`` to everyone (``any_principal``), which wins over
the grants above.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from native_fixtures import (
    CLIENT,
    NativeFactory,
    NativeHarness,
    TlsMaterial,
)

from securebroker.authz.devkit import cert_thumbprint, public_jwk
from securebroker.authz.policy import PolicyStore
from securebroker.authz.service import Auth, PolicyAuthorizer
from securebroker.authz.tokens import (
    JwtAuthenticator,
    KeySource,
    TokenVerifier,
    VerifierSettings,
    mint_token,
)
from securebroker.client import Client, TokenProvider

ISSUER = "https://issuer.test"
AUDIENCE = "securebroker"
ORDERS_SVC = "svc-orders"
ALGORITHMS = frozenset({"EdDSA", "ES256"})
#: the key ids the issuer has; ``rogue`` is never published in the JWKS
KIDS = ("k1", "k2", "rogue")

POLICY = """\
version = 1

[[rules]]
id = "orders-service"
description = "the orders service produces and consumes everything under orders"
actions = ["publish", "consume"]
topics = ["orders.#"]
subjects = ["svc-orders"]

[[rules]]
id = "auditors-read-payments"
description = "auditors read one level below payments, nothing else"
actions = ["consume"]
topics = ["payments.*"]
roles = ["auditor"]

[[rules]]
id = "orders-admins"
actions = ["admin"]
topics = ["orders.#"]
roles = ["orders-admin"]

[[rules]]
id = "admin-certificate-payments"
description = "certificate-only rule: no token needed"
actions = ["admin", "publish", "consume"]
topics = ["payments.#", "orders.internal.#"]
certificates = ["spiffe://securebroker.dev/dev-admin"]

[[rules]]
id = "no-internal-orders"
description = "nobody publishes internal order events from outside"
effect = "deny"
actions = ["publish"]
topics = ["orders.internal.#"]
any_principal = true
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    """A JWS in compact form built by hand (for tokens no library will sign)."""
    return ".".join(
        (
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(claims).encode()),
            b64url(signature),
        )
    )


def hmac_token(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes) -> str:
    """An HS256 JWS signed with ``secret`` (PyJWT refuses a PEM public key as HMAC secret)."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private_pem: bytes
    public_pem: bytes
    jwk: dict[str, str]


def _pem(private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    return (
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def ed25519_key(kid: str) -> SigningKey:
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem, public_pem = _pem(private)
    return SigningKey(kid, "EdDSA", private_pem, public_pem, public_jwk(private.public_key(), kid))


def p256_key(kid: str) -> SigningKey:
    private = ec.generate_private_key(ec.SECP256R1())
    numbers = private.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
        "kid": kid,
        "use": "sig",
        "alg": "ES256",
    }
    private_pem, public_pem = _pem(private)
    return SigningKey(kid, "ES256", private_pem, public_pem, jwk)


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and ``os.replace`` it over ``path``.

    The new file is a new inode (created while the old one still exists), and its mtime is set
    strictly later than the old file's, so a ``(mtime, size, inode)`` check sees the change
    even when the size is equal and the rewrite lands within the file system's timestamp
    granularity (or reuses an inode number freed by an earlier rewrite)."""
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    mtime = tmp.stat().st_mtime_ns
    if old is not None:
        mtime = max(mtime, old.st_mtime_ns + 1_000_000_000)
    os.utime(tmp, ns=(mtime, mtime))
    os.replace(tmp, path)
    new = path.stat()
    assert old is None or (new.st_ino, new.st_mtime_ns) != (old.st_ino, old.st_mtime_ns)


@dataclass
class Issuer:
    """A test identity provider: signing keys, a JWKS file, a policy directory, and mint."""

    root: Path
    tls: TlsMaterial
    keys: dict[str, SigningKey]
    jwks_path: Path
    policy_dir: Path

    @property
    def policy_file(self) -> Path:
        return self.policy_dir / "policy.toml"

    # -- files ---------------------------------------------------------------------------------
    def publish_keys(self, *kids: str) -> None:
        """Make the JWKS file hold exactly the public keys ``kids`` (atomically)."""
        self.write_jwks({"keys": [self.keys[k].jwk for k in kids]})

    def write_jwks(self, document: Any) -> None:
        self.write_jwks_bytes(json.dumps(document, indent=2).encode())

    def write_jwks_bytes(self, data: bytes) -> None:
        replace_atomically(self.jwks_path, data)

    def write_policy(self, text: str) -> None:
        replace_atomically(self.policy_file, text.encode())

    # -- tokens --------------------------------------------------------------------------------
    def thumbprint(self, client: str = CLIENT) -> str:
        """``x5t#S256`` of a dev client certificate."""
        return cert_thumbprint(self.tls.pki.clients[client][0])

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """A valid claim set (unsigned), bound to dev-client, for hand-built tokens."""
        now = int(datetime.now(UTC).timestamp())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": ORDERS_SVC,
            "iat": now,
            "exp": now + 900,
            "cnf": {"x5t#S256": self.thumbprint()},
        }
        claims.update(overrides)
        return claims

    def mint(
        self,
        *,
        kid: str = "k1",
        subject: str = ORDERS_SVC,
        roles: Iterable[str] = (),
        lifetime: timedelta = timedelta(minutes=15),
        bind: str | None = CLIENT,
        now: datetime | None = None,
        extra: Mapping[str, Any] | None = None,
        drop: Iterable[str] = (),
        sign_with: str | None = None,
    ) -> str:
        """A signed token. ``kid`` is the header's key id; ``sign_with`` the key that actually
        signs (default: the key ``kid`` names). ``bind`` is the client certificate the token is
        bound to (None: unbound); ``extra`` overrides claims, ``drop`` removes them."""
        signer = self.keys[sign_with or kid]
        token = mint_token(
            signer.private_pem,
            kid=kid,
            subject=subject,
            issuer=ISSUER,
            audience=AUDIENCE,
            lifetime=lifetime,
            algorithm=signer.algorithm,
            roles=tuple(roles),
            bind_thumbprint=None if bind is None else self.thumbprint(bind),
            extra=extra,
            now=now,
        )
        dropped = set(drop)
        if not dropped:
            return token
        claims = jwt.decode(token, options={"verify_signature": False})
        for name in dropped:
            claims.pop(name, None)
        return jwt.encode(
            claims, signer.private_pem, algorithm=signer.algorithm, headers={"kid": kid}
        )


def make_issuer(root: Path, tls: TlsMaterial) -> Issuer:
    """An issuer in ``root`` publishing k1 and k2, with ``POLICY`` in its policy directory."""
    root.mkdir(parents=True, exist_ok=True)
    policy_dir = root / "policy"
    policy_dir.mkdir()
    issuer = Issuer(
        root=root,
        tls=tls,
        keys={"k1": ed25519_key("k1"), "k2": p256_key("k2"), "rogue": ed25519_key("rogue")},
        jwks_path=root / "jwks.json",
        policy_dir=policy_dir,
    )
    issuer.publish_keys("k1", "k2")
    issuer.write_policy(POLICY)
    return issuer


@dataclass
class AuthNative:
    """A started broker enforcing tokens and the issuer's policy."""

    h: NativeHarness
    issuer: Issuer
    authenticator: JwtAuthenticator
    keys: KeySource
    policies: PolicyStore
    #: the same wiring ``securebroker serve`` builds (``Auth.reload_policies`` is the SIGHUP path)
    auth: Auth

    async def connect(
        self,
        name: str = CLIENT,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        reconnect: bool = False,
    ) -> Client:
        """An SDK client; no reconnects by default, so a closed connection stays closed."""
        return await self.h.connect(
            name, token=token, token_provider=token_provider, reconnect=reconnect
        )

    def reasons(self) -> list[str]:
        """The server's refusal reasons so far."""
        return [reason for _peer, reason in self.h.refusals]


AuthFactory = Callable[..., Awaitable[AuthNative]]


@pytest.fixture(name="issuer")
def issuer_fixture(tmp_path: Path, tls_material: TlsMaterial) -> Issuer:
    return make_issuer(tmp_path / "issuer", tls_material)


@pytest.fixture(name="auth_native")
def auth_native_fixture(native_factory: NativeFactory, issuer: Issuer) -> AuthFactory:
    """Factory: ``await auth_native(require_bound=False, require_token=True,
    leeway=timedelta(seconds=30), max_lifetime=timedelta(hours=24), **listener_overrides)``."""

    async def start(
        *,
        require_bound: bool = False,
        require_token: bool = True,
        leeway: timedelta = timedelta(seconds=30),
        max_lifetime: timedelta = timedelta(hours=24),
        **overrides: Any,
    ) -> AuthNative:
        settings = VerifierSettings(
            issuer=ISSUER,
            audience=AUDIENCE,
            algorithms=ALGORITHMS,
            leeway=leeway,
            max_lifetime=max_lifetime,
            require_bound=require_bound,
        )
        keys = KeySource(ALGORITHMS, file=issuer.jwks_path)
        authenticator = JwtAuthenticator(TokenVerifier(settings, keys), require_token=require_token)
        await authenticator.start()
        policies = PolicyStore(issuer.policy_dir)
        authorizer = PolicyAuthorizer(policies)
        h = await native_factory(authenticator=authenticator, authorizer=authorizer, **overrides)
        auth = Auth(
            authenticator=authenticator,
            authorizer=authorizer,
            policies=policies,
            token_grace=float(overrides.get("token_grace", 0.0)),
        )
        return AuthNative(h, issuer, authenticator, keys, policies, auth)

    return start
