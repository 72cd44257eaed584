"""Token verification pieces without a network server: JWKS parsing, key sources, the verifier.

The table-driven negative suite over real TLS is ``tests/integration/test_auth_negative.py``;
these tests pin down the building blocks and their error messages (which must never carry key
material).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from securebroker.authz.devkit import public_jwk
from securebroker.authz.service import build_auth
from securebroker.authz.tokens import (
    JwtAuthenticator,
    KeySource,
    TokenVerifier,
    VerifierSettings,
    mint_token,
    parse_jwks,
)
from securebroker.config import AuthConfig
from securebroker.errors import AuthenticationError, ConfigError, TokenExpired
from securebroker.tls import PeerIdentity

ALL = frozenset({"EdDSA", "ES256", "RS256", "PS256"})
ISS, AUD = "https://issuer.test", "securebroker"


def pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    d = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    d["kid"] = kid
    return d


def peer(thumb: str = "thumb-A") -> PeerIdentity:
    return PeerIdentity(
        subject="CN=dev-client",
        common_name="dev-client",
        sans=(),
        principal="spiffe://securebroker.dev/dev-client",
        thumbprint_s256=thumb,
        not_after=datetime.now(UTC) + timedelta(days=1),
    )


@pytest.fixture
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def write_jwks(path: Path, *jwks: dict[str, str]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": list(jwks)}))
    os.replace(tmp, path)
    return path


# -- parse_jwks ---------------------------------------------------------------------------------
def test_parse_jwks_selects_algorithms_by_key_type(ed_key: ed25519.Ed25519PrivateKey) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = json.loads(
        jwt.algorithms.RSAAlgorithm.to_jwk(
            rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        )
    )
    rsa_jwk["kid"] = "r"
    keys = parse_jwks(
        json.dumps({"keys": [public_jwk(ed_key.public_key(), "e"), ec_jwk(ec_key, "c"), rsa_jwk]}),
        ALL,
        source="test",
    )
    assert keys["e"].algorithms == ("EdDSA",)
    assert keys["c"].algorithms == ("ES256",)
    assert keys["r"].algorithms == ("PS256", "RS256")  # the allow-list, not the whole family


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        pytest.param("not json", "not valid JSON", id="not-json"),
        pytest.param('{"keys": 1}', '"keys" list', id="keys-not-list"),
        pytest.param('{"keys": [1]}', "key 0: must be an object", id="key-not-object"),
        pytest.param(
            '{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}',
            "private or symmetric",
            id="symmetric-key",
        ),
        pytest.param(
            '{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA"}]}', '"kid"', id="no-kid"
        ),
        pytest.param(
            '{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "a", '
            '"alg": "RS256"}]}',
            "does not fit",
            id="alg-mismatch",
        ),
        pytest.param(
            '{"keys": [{"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA", "kid": "a"}]}',
            "unsupported key type",
            id="unsupported-curve",
        ),
        pytest.param(
            '{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!!", "kid": "a"}]}',
            "not a valid OKP key",
            id="bad-key-bytes",
        ),
    ],
)
def test_parse_jwks_errors_are_specific(doc: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="JWKS test") as info:
        parse_jwks(doc, ALL, source="test")
    assert needle in str(info.value)


def test_private_key_material_in_jwks_is_refused_without_echo() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    private["kid"] = "leaky"
    with pytest.raises(ConfigError, match="private or symmetric") as info:
        parse_jwks(json.dumps({"keys": [private]}), ALL, source="test")
    assert private["d"] not in str(info.value)


def test_duplicate_kid_is_refused(ed_key: ed25519.Ed25519PrivateKey) -> None:
    jwk = public_jwk(ed_key.public_key(), "same")
    with pytest.raises(ConfigError, match="duplicate kid"):
        parse_jwks(json.dumps({"keys": [jwk, jwk]}), ALL, source="test")


def test_keys_outside_the_allow_list_are_ignored(ed_key: ed25519.Ed25519PrivateKey) -> None:
    keys = parse_jwks(
        json.dumps({"keys": [public_jwk(ed_key.public_key(), "e")]}),
        frozenset({"ES256"}),
        source="test",
    )
    assert keys == {}


@pytest.mark.parametrize("alg", ["HS256", "none", "ES256K"])
def test_settings_refuse_non_asymmetric_algorithms(alg: str) -> None:
    with pytest.raises(ConfigError, match=r"auth\.algorithms"):
        VerifierSettings(issuer=ISS, audience=AUD, algorithms=frozenset({"ES256", alg}))


# -- the verifier -------------------------------------------------------------------------------
@pytest.fixture
def verifier(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> TokenVerifier:
    jwks = write_jwks(tmp_path / "jwks.json", public_jwk(ed_key.public_key(), "k1"))
    keys = KeySource(ALL, file=jwks)
    keys.reload_file(force=True)
    return TokenVerifier(
        VerifierSettings(issuer=ISS, audience=AUD, algorithms=ALL, leeway=timedelta(0)), keys
    )


def mint(key: ed25519.Ed25519PrivateKey, **kw: object) -> str:
    args: dict[str, object] = {"kid": "k1", "subject": "svc", "issuer": ISS, "audience": AUD}
    args.update(kw)
    return mint_token(pem(key), **args)  # type: ignore[arg-type]


async def test_valid_token_gives_a_principal(
    verifier: TokenVerifier, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    token = mint(
        ed_key,
        roles=["payments-writer"],
        tenant="acme",
        bind_thumbprint="thumb-A",
        extra={"groups": "ops audit"},
    )
    p = await verifier.verify(token, peer())
    assert (p.name, p.subject, p.tenant, p.issuer) == ("svc", "svc", "acme", ISS)
    assert p.roles == {"payments-writer", "ops", "audit"}
    assert p.bound_thumbprint == "thumb-A"
    assert p.token_expires_at is not None and p.token_expires_at > datetime.now(UTC)


@pytest.mark.parametrize(
    ("kw", "detail"),
    [
        pytest.param({"issuer": "https://evil.test"}, "wrong issuer", id="iss"),
        pytest.param({"audience": "other"}, "wrong audience", id="aud"),
        pytest.param({"kid": "nope"}, "unknown kid", id="kid"),
        pytest.param({"extra": {"sub": None}}, "'sub' claim", id="no-sub"),
        pytest.param({"extra": {"sub": ""}}, "sub must be", id="empty-sub"),
        pytest.param({"extra": {"iat": None}}, "'iat' claim", id="no-iat"),
        pytest.param({"lifetime": timedelta(days=2)}, "lifetime exceeds", id="too-long"),
        pytest.param(
            {"extra": {"nbf": int(datetime.now(UTC).timestamp()) + 3600}}, "not yet valid", id="nbf"
        ),
        pytest.param({"bind_thumbprint": "thumb-B"}, "another certificate", id="bound-elsewhere"),
        pytest.param({"extra": {"cnf": "x"}}, "cnf claim", id="cnf-not-object"),
    ],
)
async def test_rejections_are_opaque_with_a_specific_detail(
    verifier: TokenVerifier, ed_key: ed25519.Ed25519PrivateKey, kw: dict[str, object], detail: str
) -> None:
    extra = dict(kw.pop("extra", {}) or {})  # type: ignore[call-overload]
    token = mint(ed_key, extra={k: v for k, v in extra.items() if v is not None}, **kw)
    if any(v is None for v in extra.values()):  # drop a required claim entirely
        claims = jwt.decode(token, options={"verify_signature": False})
        for k, v in extra.items():
            if v is None:
                claims.pop(k)
        token = jwt.encode(claims, pem(ed_key), algorithm="EdDSA", headers={"kid": "k1"})
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify(token, peer())
    assert info.value.message == "authentication failed"
    assert detail in (info.value.detail or "")


async def test_expired_token_is_token_expired(
    verifier: TokenVerifier, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    token = mint(ed_key, now=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(TokenExpired):
        await verifier.verify(token, peer())


async def test_wrong_key_for_kid_is_a_bad_signature(verifier: TokenVerifier) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify(mint(other), peer())
    assert "bad signature" in (info.value.detail or "")


async def test_binding_required_refuses_unbound_tokens(
    tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", public_jwk(ed_key.public_key(), "k1"))
    keys = KeySource(ALL, file=jwks)
    keys.reload_file(force=True)
    v = TokenVerifier(
        VerifierSettings(issuer=ISS, audience=AUD, algorithms=ALL, require_bound=True), keys
    )
    with pytest.raises(AuthenticationError) as info:
        await v.verify(mint(ed_key), peer())
    assert "binding is required" in (info.value.detail or "")
    assert (await v.verify(mint(ed_key, bind_thumbprint="thumb-A"), peer())).subject == "svc"


async def test_authenticator_without_token() -> None:
    optional = JwtAuthenticator(None, require_token=False)
    p = await optional.authenticate(peer(), None)
    assert (p.name, p.subject) == ("spiffe://securebroker.dev/dev-client", None)
    with pytest.raises(AuthenticationError) as info:
        await optional.authenticate(peer(), "a.b.c")
    assert "no JWKS" in (info.value.detail or "")
    with pytest.raises(ConfigError):
        JwtAuthenticator(None, require_token=True)


# -- key sources --------------------------------------------------------------------------------
async def test_file_source_reloads_on_change_and_keeps_keys_on_a_broken_file(
    tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    new = ed25519.Ed25519PrivateKey.generate()
    path = write_jwks(tmp_path / "jwks.json", public_jwk(ed_key.public_key(), "k1"))
    src = KeySource(ALL, file=path)
    await src.start()
    assert src.kids == ["k1"]
    write_jwks(path, public_jwk(new.public_key(), "k2"))
    assert await src.get("k2") is not None
    assert await src.get("k1") is None  # removed keys are gone
    path.write_text("{broken")
    assert await src.get("k2") is not None  # the previous keys stay
    with pytest.raises(ConfigError, match="not valid JSON"):
        src.reload_file(force=True)


async def test_a_broken_jwks_file_is_reported_once_per_change(
    tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_jwks(tmp_path / "jwks.json", public_jwk(ed_key.public_key(), "k1"))
    src = KeySource(ALL, file=path)
    await src.start()
    path.write_text("{broken")
    for _ in range(5):
        assert await src.get("k1") is not None
    assert [r.message for r in caplog.records].count(
        f"JWKS file not reloaded, keeping the previous keys: JWKS {path}: not valid JSON"
    ) == 1


async def test_missing_jwks_file_stops_startup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        await KeySource(ALL, file=tmp_path / "absent.json").start()


@pytest.mark.parametrize(
    "url", ["http://issuer.example/jwks.json", "file:///etc/passwd", "ftp://127.0.0.1/x"]
)
def test_jwks_url_must_be_https_or_loopback(url: str) -> None:
    with pytest.raises(ConfigError, match="https"):
        KeySource(ALL, url=url)


class _Jwks(http.server.BaseHTTPRequestHandler):
    body = b""
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, type[_Jwks]]]:
    handler = type("Handler", (_Jwks,), {"body": b"", "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", handler
    finally:
        server.shutdown()
        server.server_close()


async def test_url_source_refetches_an_unknown_kid_at_most_once_per_interval(
    jwks_server: tuple[str, type[_Jwks]], ed_key: ed25519.Ed25519PrivateKey
) -> None:
    url, handler = jwks_server
    handler.body = json.dumps({"keys": [public_jwk(ed_key.public_key(), "k1")]}).encode()
    src = KeySource(ALL, url=url, refetch_interval=3600)
    await src.start()
    assert handler.hits == 1 and src.kids == ["k1"]
    # unknown kids: the first miss after the interval would refetch; within it, none does
    results = await asyncio.gather(*(src.get(f"unknown-{i}") for i in range(20)))
    assert results == [None] * 20
    assert handler.hits == 1
    # a forced refetch (SIGHUP, the periodic refresh) picks up a rotated key
    new = ed25519.Ed25519PrivateKey.generate()
    handler.body = json.dumps({"keys": [public_jwk(new.public_key(), "k2")]}).encode()
    assert await src.fetch_url(force=True)
    assert src.kids == ["k2"]


async def test_url_source_refetch_on_unknown_kid_after_the_interval(
    jwks_server: tuple[str, type[_Jwks]], ed_key: ed25519.Ed25519PrivateKey
) -> None:
    url, handler = jwks_server
    handler.body = json.dumps({"keys": [public_jwk(ed_key.public_key(), "k1")]}).encode()
    src = KeySource(ALL, url=url, refetch_interval=0)
    await src.start()
    new = ed25519.Ed25519PrivateKey.generate()
    handler.body = json.dumps(
        {"keys": [public_jwk(ed_key.public_key(), "k1"), public_jwk(new.public_key(), "k2")]}
    ).encode()
    assert await src.get("k2") is not None
    assert handler.hits == 2


async def test_url_failure_keeps_previous_keys(
    jwks_server: tuple[str, type[_Jwks]], ed_key: ed25519.Ed25519PrivateKey
) -> None:
    url, handler = jwks_server
    handler.body = json.dumps({"keys": [public_jwk(ed_key.public_key(), "k1")]}).encode()
    src = KeySource(ALL, url=url, refetch_interval=0)
    await src.start()
    handler.body = b"<html>oops</html>"
    assert not await src.fetch_url(force=True)
    assert src.kids == ["k1"]


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        pytest.param(AuthConfig(), "auth.policy", id="no-policy"),
        pytest.param(AuthConfig(policy="p"), "auth.jwks_file", id="token-without-keys"),
        pytest.param(
            AuthConfig(policy="p", jwks_file="j", audience=AUD), "auth.issuer", id="no-issuer"
        ),
        pytest.param(
            AuthConfig(policy="p", jwks_file="j", issuer=ISS), "auth.audience", id="no-audience"
        ),
        pytest.param(
            AuthConfig(policy="p", require_token=False, require_bound_token=True),
            "auth.require_bound_token",
            id="binding-without-keys",
        ),
        pytest.param(
            AuthConfig(policy="p", jwks_file="j", issuer=ISS, audience=AUD, algorithms=["HS256"]),
            "auth.algorithms",
            id="hmac",
        ),
    ],
)
def test_auth_config_errors_name_the_key(cfg: AuthConfig, key: str, tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ConfigError) as info:
            build_auth(cfg)
    finally:
        os.chdir(cwd)
    assert str(info.value).startswith(key)
