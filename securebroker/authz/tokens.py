"""Bearer-token verification: JWTs signed with asymmetric keys from a JWKS, selected by ``kid``.

What is checked, in order, and why:

1. The header names a ``kid`` that is in the key set. An unknown ``kid`` first triggers a reload
   (the JWKS file when it changed on disk; the JWKS URL at most once per
   ``refetch_interval``), so a key rotated in by the issuer works without a restart.
2. The algorithm is never taken from the token. Each key gets the algorithms it may verify:
   its JWK ``alg`` if it names one, else every algorithm of its key type, always intersected with
   the operator's allow-list (asymmetric algorithms only). ``alg: none`` and HMAC algorithms
   (the "HS256 signed with the public key" confusion) are therefore impossible.
3. Signature, then ``iss``, ``aud``, ``exp``, ``iat``, ``sub`` (all required) and ``nbf`` (if
   present), with a small leeway for clock skew; a token may not live longer than
   ``max_lifetime``.
4. RFC 8705 binding: a token carrying ``cnf.x5t#S256`` is accepted only over the TLS connection
   whose client certificate has that SHA-256 thumbprint; operators can require bound tokens.

Failures raise ``AuthenticationError`` whose wire message is the opaque ``authentication
failed`` (``TokenExpired`` for a correctly signed but expired token, so clients know to refresh);
the specific reason is in ``detail`` for the audit log, never on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from securebroker.errors import AuthenticationError, ConfigError, TokenExpired
from securebroker.server.auth import Principal
from securebroker.tls import PeerIdentity

log = logging.getLogger(__name__)

#: every asymmetric JWS algorithm PyJWT implements; HMAC and ``none`` are never acceptable
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_BY_KEY_TYPE: dict[tuple[str, str | None], frozenset[str]] = {
    ("RSA", None): frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
}
#: JWK members that only private (or symmetric) keys have: a JWKS holding them is refused
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MAX_JWKS_BYTES = 1 << 20
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "sub")

OPAQUE = "authentication failed"


def auth_failed(detail: str) -> AuthenticationError:
    return AuthenticationError(OPAQUE, detail=detail)


@dataclass(frozen=True, slots=True)
class VerifierSettings:
    issuer: str
    audience: str
    algorithms: frozenset[str]
    leeway: timedelta = timedelta(seconds=30)
    max_lifetime: timedelta = timedelta(hours=24)
    require_bound: bool = False
    roles_claims: tuple[str, ...] = ("roles", "groups")
    tenant_claim: str = "tenant"

    def __post_init__(self) -> None:
        if not self.algorithms:
            raise ConfigError("auth.algorithms: must list at least one algorithm")
        bad = sorted(self.algorithms - ASYMMETRIC_ALGORITHMS)
        if bad:
            raise ConfigError(
                f"auth.algorithms: {', '.join(bad)} not allowed "
                f"(asymmetric only: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
            )


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    key: jwt.PyJWK
    algorithms: tuple[str, ...]
    #: the JWK as canonical JSON, to tell whether a reload changed anything
    canonical: str


def parse_jwks(
    raw: bytes | str, allowed: frozenset[str], *, source: str
) -> dict[str, VerificationKey]:
    """Parse a JWKS document into ``kid -> key``. Errors name the source and key index, never
    key material."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"JWKS {source}: not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(f'JWKS {source}: must be an object with a "keys" list')
    out: dict[str, VerificationKey] = {}
    for i, jwk in enumerate(doc["keys"]):
        where = f"JWKS {source}: key {i}"
        if not isinstance(jwk, dict):
            raise ConfigError(f"{where}: must be an object")
        if _PRIVATE_MEMBERS & jwk.keys():
            raise ConfigError(
                f"{where}: holds private or symmetric key material; publish public keys only"
            )
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise ConfigError(f'{where}: "kid" is required (a string of 1-256 characters)')
        if kid in out:
            raise ConfigError(f"{where}: duplicate kid {kid!r}")
        if jwk.get("use", "sig") != "sig":
            continue  # an encryption key: not for us
        kty, crv = jwk.get("kty"), jwk.get("crv")
        family = _BY_KEY_TYPE.get((str(kty), None if kty == "RSA" else str(crv)))
        if family is None:
            raise ConfigError(f"{where} ({kid!r}): unsupported key type {kty!r}/{crv!r}")
        alg = jwk.get("alg")
        if alg is not None:
            if alg not in family:
                raise ConfigError(f"{where} ({kid!r}): alg {alg!r} does not fit key type {kty!r}")
            family = frozenset({alg})
        algorithms = tuple(sorted(family & allowed))
        if not algorithms:
            log.warning("JWKS %s: key %r has no algorithm in auth.algorithms; ignored", source, kid)
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=algorithms[0])
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):  # msg echoes the JWK
            raise ConfigError(f"{where} ({kid!r}): not a valid {kty} key") from None
        out[kid] = VerificationKey(kid, key, algorithms, json.dumps(jwk, sort_keys=True))
    return out


class KeySource:
    """A JWKS from a file and/or a URL, reloaded when it changes, refetched on an unknown kid."""

    def __init__(
        self,
        allowed: frozenset[str],
        *,
        file: Path | None = None,
        url: str | None = None,
        refetch_interval: float = 30.0,
        fetch_timeout: float = 5.0,
    ) -> None:
        if file is None and url is None:
            raise ConfigError("auth.jwks_file or auth.jwks_url: one is required to verify tokens")
        if url is not None:
            parts = urlsplit(url)
            loopback = parts.hostname in {"127.0.0.1", "::1", "localhost"}
            if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
                raise ConfigError("auth.jwks_url: must be an https:// URL")
        self.allowed = allowed
        self.file = file
        self.url = url
        self.refetch_interval = refetch_interval
        self.fetch_timeout = fetch_timeout
        self._file_keys: dict[str, VerificationKey] = {}
        self._url_keys: dict[str, VerificationKey] = {}
        self._file_stamp: tuple[int, int, int] | None = None
        self._last_fetch = -float("inf")
        self._fetch_lock = asyncio.Lock()
        #: bumped whenever the key set changes, so caches keyed on it notice
        self.generation = 0

    # -- file ------------------------------------------------------------------------------------
    def _stamp(self) -> tuple[int, int, int] | None:
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_file(self, *, force: bool = False) -> bool:
        """Reload the JWKS file if it changed (cheap ``stat`` otherwise). A broken file keeps the
        previous keys and raises ``ConfigError``. Returns True when the keys changed."""
        if self.file is None:
            return False
        stamp = self._stamp()
        if stamp == self._file_stamp and not force:
            return False
        # Remember this state even if it is broken: a bad file is reported once per change,
        # not re-parsed on every HELLO until someone fixes it.
        self._file_stamp = stamp
        if stamp is None:
            raise ConfigError(f"auth.jwks_file: {self.file} not found")
        keys = parse_jwks(self.file.read_bytes(), self.allowed, source=str(self.file))
        if not self._changed(self._file_keys, keys, "file"):
            return False
        self._file_keys = keys
        return True

    def _changed(
        self, old: Mapping[str, VerificationKey], new: Mapping[str, VerificationKey], what: str
    ) -> bool:
        """True (and logged, and ``generation`` bumped) when ``new`` differs from ``old``."""
        if _fingerprint(new) == _fingerprint(old):
            return False
        self.generation += 1
        log.info("JWKS %s loaded: %d key(s): %s", what, len(new), ", ".join(sorted(new)))
        return True

    def _reload_file_quietly(self) -> None:
        try:
            self.reload_file()
        except (ConfigError, OSError) as exc:
            log.warning("JWKS file not reloaded, keeping the previous keys: %s", _safe(exc))

    # -- URL -------------------------------------------------------------------------------------
    def _download(self) -> bytes:
        assert self.url is not None
        # the scheme is checked in __init__ (https, or http to loopback only)
        req = urllib.request.Request(self.url, headers={"Accept": "application/json"})  # noqa: S310
        with urllib.request.urlopen(req, timeout=self.fetch_timeout) as resp:  # noqa: S310
            body: bytes = resp.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ConfigError(f"auth.jwks_url: document larger than {MAX_JWKS_BYTES} bytes")
        return body

    async def fetch_url(self, *, force: bool = False) -> bool:
        """Fetch the JWKS URL off the event loop, at most once per ``refetch_interval`` unless
        forced. Failures keep the previous keys. Returns True when the keys changed."""
        if self.url is None:
            return False
        async with self._fetch_lock:
            now = time.monotonic()
            if not force and now - self._last_fetch < self.refetch_interval:
                return False
            self._last_fetch = now
            try:
                body = await asyncio.to_thread(self._download)
                keys = parse_jwks(body, self.allowed, source=self.url)
            except (OSError, ConfigError) as exc:
                log.warning("JWKS URL not fetched, keeping the previous keys: %s", _safe(exc))
                return False
            if not self._changed(self._url_keys, keys, "URL"):
                return False
            self._url_keys = keys
            return True

    # -- lookup ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.file is not None:
            self.reload_file(force=True)
        if self.url is not None:
            await self.fetch_url(force=True)

    async def get(self, kid: str) -> VerificationKey | None:
        """The key for ``kid``; on a miss, reload what may have changed (rate-limited)."""
        self._reload_file_quietly()  # a stat; reloads a rotated file so removed keys go away
        key = self._lookup(kid)
        if key is None and self.url is not None:
            await self.fetch_url()
            key = self._lookup(kid)
        return key

    def _lookup(self, kid: str) -> VerificationKey | None:
        return self._file_keys.get(kid) or self._url_keys.get(kid)

    @property
    def kids(self) -> list[str]:
        return sorted({*self._file_keys, *self._url_keys})


def _fingerprint(keys: Mapping[str, VerificationKey]) -> dict[str, str]:
    return {k: v.canonical for k, v in keys.items()}


def _safe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ConfigError) else exc.__class__.__name__


class TokenVerifier:
    def __init__(self, settings: VerifierSettings, keys: KeySource) -> None:
        self.settings = settings
        self.keys = keys

    async def verify(self, token: str, peer: PeerIdentity) -> Principal:
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise auth_failed("malformed token") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise auth_failed("token has no kid")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in s.algorithms:
            raise auth_failed(f"token algorithm {str(alg)[:16]!r} is not allowed")
        key = await self.keys.get(kid)
        if key is None:
            raise auth_failed(f"unknown kid {kid[:64]!r}")
        if alg not in key.algorithms:
            raise auth_failed(f"token algorithm {alg!r} does not fit key {kid!r}")
        try:
            claims = jwt.decode(
                token,
                key.key.key,
                algorithms=list(key.algorithms),
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("token expired", detail="token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise auth_failed(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidIssuerError:
            raise auth_failed("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise auth_failed("wrong audience") from None
        except jwt.ImmatureSignatureError:
            raise auth_failed("token not yet valid (nbf or iat in the future)") from None
        except jwt.InvalidSignatureError:
            raise auth_failed(f"bad signature (kid {kid!r})") from None
        except jwt.InvalidTokenError as exc:
            raise auth_failed(f"invalid token: {exc.__class__.__name__}") from None
        return self._principal(claims, peer)

    def _principal(self, claims: dict[str, Any], peer: PeerIdentity) -> Principal:
        s = self.settings
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > 1024:
            raise auth_failed("sub must be a non-empty string")
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(iat, int | float) or not isinstance(exp, int | float):
            raise auth_failed("iat and exp must be numbers")
        if exp - iat > s.max_lifetime.total_seconds():
            raise auth_failed("token lifetime exceeds auth.max_token_lifetime_seconds")
        bound = _thumbprint(claims.get("cnf"))
        if bound is not None:
            if not hmac.compare_digest(bound.encode(), peer.thumbprint_s256.encode()):
                raise auth_failed("token is bound to another certificate")
        elif s.require_bound:
            raise auth_failed("unbound token where certificate binding is required")
        tenant = claims.get(s.tenant_claim)
        return Principal(
            name=sub,
            peer=peer,
            subject=sub,
            roles=frozenset(_strings(claims.get(c) for c in s.roles_claims)),
            tenant=tenant if isinstance(tenant, str) else None,
            issuer=claims["iss"],
            token_expires_at=datetime.fromtimestamp(exp, UTC),
            bound_thumbprint=bound,
        )


def _thumbprint(cnf: Any) -> str | None:
    if cnf is None:
        return None
    value = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
    if value is None:
        if isinstance(cnf, dict):
            return None  # another confirmation method we don't implement: treated as unbound
        raise auth_failed("cnf claim is not an object")
    if not isinstance(value, str) or not value:
        raise auth_failed("cnf.x5t#S256 is not a string")
    return value


def _strings(values: Iterable[Any]) -> Iterable[str]:
    """Roles/groups claims: a list of strings or one space-separated string (OAuth scope style)."""
    for v in values:
        if isinstance(v, str):
            yield from v.split()
        elif isinstance(v, list):
            yield from (x for x in v if isinstance(x, str))


class JwtAuthenticator:
    """HELLO/AUTH: verify the bearer token, or accept a certificate-only principal when tokens
    are optional. Implements ``securebroker.server.auth.Authenticator``."""

    def __init__(self, verifier: TokenVerifier | None, *, require_token: bool) -> None:
        if verifier is None and require_token:
            raise ConfigError("auth.require_token: needs auth.jwks_file or auth.jwks_url")
        self.verifier = verifier
        self.require_token = require_token

    async def start(self) -> None:
        if self.verifier is not None:
            await self.verifier.keys.start()

    async def authenticate(self, peer: PeerIdentity, token: str | None) -> Principal:
        if token is None:
            if self.require_token:
                raise auth_failed("no token presented (auth.require_token is on)")
            return Principal(name=peer.principal, peer=peer)
        if self.verifier is None:
            raise auth_failed("token presented but no JWKS is configured")
        return await self.verifier.verify(token, peer)

    async def refresh_keys(self) -> None:
        """Reload the JWKS file and refetch the URL now (SIGHUP)."""
        if self.verifier is None:
            return
        ks = self.verifier.keys
        with contextlib.suppress(ConfigError):
            ks.reload_file(force=True)
        await ks.fetch_url(force=True)


def mint_token(
    private_key_pem: bytes,
    *,
    kid: str,
    subject: str,
    issuer: str,
    audience: str,
    lifetime: timedelta = timedelta(minutes=15),
    algorithm: str = "EdDSA",
    roles: Sequence[str] = (),
    tenant: str | None = None,
    bind_thumbprint: str | None = None,
    extra: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> str:
    """Sign a token (development and tests: production tokens come from your identity
    provider)."""
    issued = now or datetime.now(UTC)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": int(issued.timestamp()),
        "exp": int((issued + lifetime).timestamp()),
    }
    if roles:
        claims["roles"] = list(roles)
    if tenant is not None:
        claims["tenant"] = tenant
    if bind_thumbprint is not None:
        claims["cnf"] = {"x5t#S256": bind_thumbprint}
    claims.update(extra or {})
    return jwt.encode(claims, private_key_pem, algorithm=algorithm, headers={"kid": kid})
