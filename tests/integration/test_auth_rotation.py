"""Signing-key rotation with clients connected, against the real NativeServer.

The broker's ``KeySource`` re-``stat``s the JWKS file on every HELLO and AUTH and reloads it
when it changed, so rotating the issuer's key needs no restart: a new connection is verified
against the key set as it is on disk now. A connection already authenticated keeps its
principal until its token expires or it refreshes; a refresh is verified like a new HELLO
(against the current keys). A broken rewrite of the JWKS keeps the previous keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from auth_fixtures import (
    ORDERS_SVC,
    AuthFactory,
    AuthNative,
    Issuer,
    auth_native_fixture,  # noqa: F401  (the auth_native fixture)
    issuer_fixture,  # noqa: F401  (the issuer fixture)
)
from native_fixtures import IO_TIMEOUT, make_queue

from securebroker.client import Client
from securebroker.errors import AuthenticationError, Unavailable

TOPIC = "orders.created"
SUB = "orders.created.worker"


async def publishes(client: Client, key: str) -> None:
    result = await client.publish(TOPIC, key.encode(), idempotency_key=key)
    assert result.duplicate is False


async def refused_at_hello(a: AuthNative, token: str, detail: str) -> None:
    """A new connection with ``token`` is refused, opaquely, for ``detail``."""
    before = len(a.h.refusals)
    with pytest.raises(AuthenticationError) as caught:
        await a.connect(token=token)
    assert caught.value.message == "authentication failed"
    assert a.reasons()[before:] == [f"authentication failed: {detail}"]


async def test_rotation_with_connected_clients(auth_native: AuthFactory, issuer: Issuer) -> None:
    issuer.publish_keys("k1")
    a = await auth_native()
    await make_queue(a.h, TOPIC, SUB)
    assert a.keys.kids == ["k1"]
    # k2 is not trusted yet
    await refused_at_hello(a, issuer.mint(kid="k2"), "unknown kid 'k2'")

    stays = await a.connect(token=issuer.mint(kid="k1"))
    await publishes(stays, "before-1")
    refreshed_bad = await a.connect(token=issuer.mint(kid="k1"))
    refreshed_good = await a.connect(token=issuer.mint(kid="k1"))

    # overlap: the issuer publishes k2 next to k1; both verify, no restart
    issuer.publish_keys("k1", "k2")
    overlap = await a.connect(token=issuer.mint(kid="k2"))
    await publishes(overlap, "overlap-k2")
    await publishes(await a.connect(token=issuer.mint(kid="k1")), "overlap-k1")
    assert a.keys.kids == ["k1", "k2"]

    # rotation: k1 is withdrawn
    issuer.publish_keys("k2")
    fresh = await a.connect(token=issuer.mint(kid="k2"))
    assert fresh.principal == ORDERS_SVC
    await publishes(fresh, "after-k2")
    assert a.keys.kids == ["k2"]
    await refused_at_hello(a, issuer.mint(kid="k1"), "unknown kid 'k1'")

    # Connections authenticated with k1 tokens keep their session: the token was verified at
    # HELLO and stays valid until it expires (or the client refreshes).
    await publishes(stays, "after-stays")
    await publishes(refreshed_bad, "after-bad")

    # A refresh is verified against the current keys: a k1 token fails and closes the
    # connection; a k2 token for the same subject is accepted.
    conn = a.h.connection_of(refreshed_bad)
    before = len(a.h.refusals)
    with pytest.raises(AuthenticationError) as caught:
        await refreshed_bad.refresh_token(issuer.mint(kid="k1"))
    assert caught.value.message == "authentication failed"
    assert a.reasons()[before:] == ["token refresh failed: unknown kid 'k1'"]
    async with asyncio.timeout(IO_TIMEOUT):
        await conn.closed.wait()
    with pytest.raises(Unavailable):
        await publishes(refreshed_bad, "after-bad-refresh")

    new_token = issuer.mint(kid="k2", lifetime=timedelta(minutes=30))
    await refreshed_good.refresh_token(new_token)
    await publishes(refreshed_good, "after-good-refresh")
    principal = a.h.connection_of(refreshed_good).principal
    assert principal is not None
    assert principal.token_expires_at == _exp(new_token)

    stored = [
        "before-1",
        "overlap-k2",
        "overlap-k1",
        "after-k2",
        "after-stays",
        "after-bad",
        "after-good-refresh",
    ]
    assert await a.h.message_count() == len(stored)
    assert (await a.h.counts(SUB)).ready == len(stored)
    assert a.h.denials == []


def _exp(token: str) -> datetime:
    claims = jwt.decode(token, options={"verify_signature": False})
    return datetime.fromtimestamp(claims["exp"], UTC)


def _private_jwk(issuer: Issuer) -> object:
    jwk = dict(issuer.keys["k2"].jwk)
    jwk["d"] = "AAAA"  # private material: the whole document must be refused
    return {"keys": [issuer.keys["k1"].jwk, jwk]}


BROKEN: dict[str, Callable[[Issuer], None]] = {
    "not-json": lambda i: i.write_jwks_bytes(b'{"keys": [ this is not json'),
    "no-keys-list": lambda i: i.write_jwks({"kids": []}),
    "private-key-material": lambda i: i.write_jwks(_private_jwk(i)),
    "unsupported-key-type": lambda i: i.write_jwks(
        {"keys": [i.keys["k1"].jwk, {"kty": "oct", "kid": "k3", "use": "sig"}]}
    ),
    "duplicate-kid": lambda i: i.write_jwks({"keys": [i.keys["k1"].jwk, i.keys["k1"].jwk]}),
    "deleted": lambda i: i.jwks_path.unlink(),
}


@pytest.mark.parametrize("breakage", BROKEN.values(), ids=BROKEN.keys())
async def test_broken_jwks_rewrite_keeps_the_previous_keys(
    auth_native: AuthFactory,
    issuer: Issuer,
    breakage: Callable[[Issuer], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuer.publish_keys("k2")
    a = await auth_native()
    await make_queue(a.h, TOPIC, SUB)
    connected = await a.connect(token=issuer.mint(kid="k2"))
    generation = a.keys.generation

    # (the variants listing k1 would make it trusted if they were applied, even partly)
    with caplog.at_level(logging.WARNING, logger="securebroker.authz.tokens"):
        breakage(issuer)
        fresh = await a.connect(token=issuer.mint(kid="k2"))
        await publishes(fresh, "fresh-k2")
        await refused_at_hello(a, issuer.mint(kid="k1"), "unknown kid 'k1'")
    assert any("JWKS file not reloaded" in r.getMessage() for r in caplog.records)
    assert a.keys.kids == ["k2"]
    assert a.keys.generation == generation
    await publishes(connected, "connected-k2")

    # a good rewrite after the broken one is picked up again
    issuer.publish_keys("k1", "k2")
    await publishes(await a.connect(token=issuer.mint(kid="k1")), "repaired-k1")
    assert a.keys.kids == ["k1", "k2"]
    assert await a.h.message_count() == 3


async def test_jwks_content_is_reread_when_the_file_changes(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    """The same kid with a different key (an issuer re-keying without renaming): tokens of the
    old key stop verifying, tokens of the new key start, without a restart."""
    issuer.publish_keys("k1")
    a = await auth_native()
    await make_queue(a.h, TOPIC, SUB)
    await publishes(await a.connect(token=issuer.mint(kid="k1")), "old-key")

    rekeyed = dict(issuer.keys["rogue"].jwk, kid="k1")
    issuer.write_jwks({"keys": [rekeyed]})
    await refused_at_hello(a, issuer.mint(kid="k1"), "bad signature (kid 'k1')")
    await publishes(await a.connect(token=issuer.mint(kid="k1", sign_with="rogue")), "new-key")
    assert json.loads(issuer.jwks_path.read_text())["keys"][0]["x"] == rekeyed["x"]
    assert await a.h.message_count() == 2
