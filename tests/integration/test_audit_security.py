"""Failed authentication and denied authorization land in the audit trail with their origin and
their specific reason, while the peer only ever sees the opaque refusal (DESIGN §4)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from auth_fixtures import AuthFactory, Issuer, auth_native_fixture, issuer_fixture
from native_fixtures import CLIENT, CLIENT_PRINCIPAL, IO_TIMEOUT, NativeHarness
from tls_helpers import revoked_client

from securebroker.errors import AuthenticationError, AuthorizationError, BrokerError

pytestmark = pytest.mark.asyncio
__all__ = ["auth_native_fixture", "issuer_fixture"]


async def records(h: NativeHarness, event: str) -> list[dict[str, Any]]:
    assert h.audit is not None
    await h.audit.flush()
    async with h.store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event, outcome, actor_cert, actor_sub, origin_addr, origin_proto, topic, "
            "subscription, detail::jsonb AS detail FROM sb_audit WHERE event = $1 "
            "ORDER BY chain, seq",
            event,
        )
    return [dict(r) for r in rows]


async def test_refused_token_is_recorded_with_origin_and_reason(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    a = await auth_native()
    with pytest.raises(AuthenticationError) as refused:
        await a.connect(token=issuer.mint(kid="k1", sign_with="rogue"))
    assert "signature" not in str(refused.value).lower()  # opaque on the wire
    [rec] = await records(a.h, "authentication_failed")
    assert rec["outcome"] == "failure"
    assert rec["actor_cert"] == CLIENT_PRINCIPAL
    assert rec["origin_proto"] == "native"
    assert rec["origin_addr"].startswith("127.0.0.1:")
    assert "signature" in rec["detail"]["reason"].lower()
    token = issuer.mint(kid="k1", sign_with="rogue")
    assert token not in str(rec)  # never the token itself


async def test_denied_publish_is_recorded_with_topic_action_and_reason(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    a = await auth_native()
    await a.h.broker.create_topic("payments.cards")
    client = await a.connect(token=issuer.mint())
    with pytest.raises(AuthorizationError):
        await client.publish("payments.cards", b"x")
    [rec] = await records(a.h, "authorization_denied")
    assert rec["outcome"] == "failure"
    assert rec["topic"] == "payments.cards"
    assert rec["detail"]["action"] == "publish"
    assert rec["actor_sub"] == "svc-orders"
    assert rec["actor_cert"] == CLIENT_PRINCIPAL
    assert rec["origin_addr"].startswith("127.0.0.1:")
    assert rec["detail"]["reason"]  # which rule (or the default) denied it


async def test_revoked_certificate_is_recorded_as_a_failed_authentication(
    native: NativeHarness,
) -> None:
    ctx = revoked_client(native.tls.pki, native.tls.revoked)
    with pytest.raises((BrokerError, ssl.SSLError, ConnectionError, OSError)):
        async with asyncio.timeout(IO_TIMEOUT):
            await native.connect(CLIENT, ssl_context=ctx, reconnect=False, retry_for=0)
    await native.wait_refusal("tls handshake failed")
    [rec] = await records(native, "authentication_failed")
    assert "tls handshake failed" in rec["detail"]["reason"]
    assert rec["origin_addr"].startswith("127.0.0.1:")
