"""A token's life on a live connection, and policy changes under live connections.

In-band refresh (AUTH) replaces the connection's principal when the new token names the same
subject, and re-makes authorization decisions under it; anything else closes the connection.
A token that expires without a refresh closes the connection (ERROR ``token_expired`` on
request 0, then CLOSE). The SDK's ``token_provider`` refreshes before expiry. A policy reload
takes effect on live connections at their next request (the decision cache follows the policy
generation); a bad policy file leaves the old one in force.

Real token expiry is wall-clock time: those tests use tokens of a few seconds and wait for the
server's own event (its refusal record, the connection closing, the provider being called),
always bounded by ``IO_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from auth_fixtures import (
    ORDERS_SVC,
    POLICY,
    AuthFactory,
    Issuer,
    auth_native_fixture,  # noqa: F401  (the auth_native fixture)
    issuer_fixture,  # noqa: F401  (the issuer fixture)
)
from native_fixtures import CLIENT, IO_TIMEOUT, close_writer, make_queue, read_frames

from securebroker.authz.policy import PolicyError
from securebroker.client import Client, Message, Subscription
from securebroker.errors import (
    AuthenticationError,
    AuthorizationError,
    TokenExpired,
    Unavailable,
)
from securebroker.protocol import PREAMBLE, FrameDecoder, Hello, encode
from securebroker.protocol import frames as f

TOPIC = "orders.created"
SUB = "orders.created.worker"
#: a short token lifetime, for the tests where a real token must expire
SHORT = timedelta(seconds=3)


def exp_of(token: str) -> datetime:
    claims = jwt.decode(token, options={"verify_signature": False})
    return datetime.fromtimestamp(claims["exp"], UTC)


async def next_message(sub: Subscription) -> Message:
    async with asyncio.timeout(IO_TIMEOUT):
        return await anext(sub)


async def wait_closed(client: Client) -> None:
    """Until the client's connection is gone (the server closed it)."""
    link = client._link
    if link is not None:
        async with asyncio.timeout(IO_TIMEOUT):
            await link.lost.wait()


# --------------------------------------------------------------------------------------------
# in-band refresh


async def test_refresh_with_the_same_subject(auth_native: AuthFactory, issuer: Issuer) -> None:
    a = await auth_native()
    await make_queue(a.h, TOPIC, SUB)
    first = issuer.mint(lifetime=timedelta(seconds=60), roles=["orders-admin"])
    client = await a.connect(token=first)
    conn = a.h.connection_of(client)
    assert conn.principal is not None and conn.principal.token_expires_at == exp_of(first)
    await client.publish(TOPIC, b"before", idempotency_key="k-1")
    await client.admin("topic.get", name=TOPIC)  # the first token's role grants admin

    second = issuer.mint(lifetime=timedelta(minutes=30))  # same subject, without the role
    await client.refresh_token(second)
    assert a.h.connection_of(client) is conn  # the same session
    assert conn.principal is not None
    assert conn.principal.token_expires_at == exp_of(second)
    assert conn.principal.roles == frozenset()

    await client.publish(TOPIC, b"after", idempotency_key="k-2")
    # decisions are re-made under the new token: the cached admin grant is gone
    with pytest.raises(AuthorizationError):
        await client.admin("topic.get", name=TOPIC)
    assert a.h.denials == [
        (ORDERS_SVC, f"svc-orders: no rule grants admin on topic {TOPIC!r}"),
    ]
    assert (await a.h.counts(SUB)).ready == 2
    assert a.reasons() == []


BAD_REFRESHES: dict[str, tuple[Callable[[Issuer], str], type[AuthenticationError], str]] = {
    "different-subject": (
        lambda i: i.mint(subject="svc-billing"),
        AuthenticationError,
        "token refresh names a different subject",
    ),
    "bound-to-another-certificate": (
        lambda i: i.mint(bind="other-client"),
        AuthenticationError,
        "token is bound to another certificate",
    ),
    "expired": (
        lambda i: i.mint(now=datetime.now(UTC) - timedelta(hours=2), lifetime=timedelta(hours=1)),
        TokenExpired,
        "token expired",
    ),
    "unknown-kid": (
        lambda i: i.mint(kid="k9", sign_with="rogue"),
        AuthenticationError,
        "unknown kid 'k9'",
    ),
    "garbage": (lambda i: "garbage", AuthenticationError, "malformed token"),
}


@pytest.mark.parametrize(
    ("make_token", "error", "detail"), BAD_REFRESHES.values(), ids=BAD_REFRESHES.keys()
)
async def test_bad_refresh_closes_the_connection(
    auth_native: AuthFactory,
    issuer: Issuer,
    make_token: Callable[[Issuer], str],
    error: type[AuthenticationError],
    detail: str,
) -> None:
    a = await auth_native()
    await make_queue(a.h, TOPIC, SUB)
    client = await a.connect(token=issuer.mint())
    await client.publish(TOPIC, b"before", idempotency_key="k-1")
    conn = a.h.connection_of(client)

    with pytest.raises(AuthenticationError) as caught:
        await client.refresh_token(make_token(issuer))
    assert type(caught.value) is error
    assert caught.value.message in {"authentication failed", "token expired"}
    assert detail not in caught.value.message or error is TokenExpired
    assert a.reasons() == [f"token refresh failed: {detail}"]

    async with asyncio.timeout(IO_TIMEOUT):
        await conn.closed.wait()
    await wait_closed(client)
    with pytest.raises(Unavailable):
        await client.publish(TOPIC, b"after", idempotency_key="k-2")
    assert await a.h.message_count() == 1
    assert conn not in a.h.server.connections


# --------------------------------------------------------------------------------------------
# expiry


async def test_expiry_without_refresh_closes_the_connection(
    auth_native: AuthFactory, issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="securebroker.client")
    a = await auth_native(leeway=timedelta(0), token_grace=0.0)
    await make_queue(a.h, TOPIC, SUB)
    token = issuer.mint(lifetime=SHORT)

    # an SDK client and a raw connection, both with the same short-lived token
    client = await a.connect(token=token)
    conn = a.h.connection_of(client)
    link = client._link
    assert link is not None
    await client.publish(TOPIC, b"while valid", idempotency_key="k-1")
    sub = client.consume(SUB, credit=10)
    assert (await next_message(sub)).payload == b"while valid"
    reader, writer = await a.h.open_raw(CLIENT)
    try:
        writer.write(PREAMBLE + encode(Hello(client="raw-test", token=token), 1))
        # every frame until the server closes the connection: WELCOME, then the expiry
        frames = await read_frames(reader, FrameDecoder(role="client"))
    finally:
        await close_writer(writer)

    refusal = await a.h.wait_refusal("expired on a live connection")
    assert refusal == f"token of {ORDERS_SVC!r} expired on a live connection"
    assert [type(fr) for _, fr in frames] == [f.Welcome, f.Error, f.Close]
    assert frames[1:] == [
        (
            0,
            f.Error(
                code=52,
                name="token_expired",
                message="token expired; refresh it with AUTH",
                retryable=False,
            ),
        ),
        (0, f.Close(code=52, reason="token expired")),
    ]

    # the SDK client was told the same way, and its connection is gone
    await wait_closed(client)
    assert link.close_reason == "token expired"
    assert any("token_expired" in r.getMessage() for r in caplog.records)
    with pytest.raises(Unavailable):
        await client.publish(TOPIC, b"after expiry", idempotency_key="k-2")
    with pytest.raises(Unavailable):  # the consumer learns its connection is gone
        await next_message(sub)
    assert await a.h.message_count() == 1
    async with asyncio.timeout(IO_TIMEOUT):
        await conn.closed.wait()
    assert [r for r in a.reasons() if "expired" in r] == [refusal, refusal]


async def test_token_provider_refreshes_before_expiry(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    a = await auth_native(leeway=timedelta(0), token_grace=0.0)
    await make_queue(a.h, TOPIC, SUB)
    tokens: list[str] = []
    calls = [asyncio.Event() for _ in range(3)]

    async def provider() -> str:
        token = issuer.mint(lifetime=SHORT)
        tokens.append(token)
        if len(tokens) <= len(calls):
            calls[len(tokens) - 1].set()
        return token

    # no reconnects: an expiry would close the connection for good, not be papered over
    client = await a.connect(token_provider=provider)
    session = a.h.connection_of(client).session
    await client.publish(TOPIC, b"first token", idempotency_key="k-1")
    assert calls[0].is_set()

    # the SDK refreshes in-band before the first token expires ...
    async with asyncio.timeout(IO_TIMEOUT):
        await calls[1].wait()
    # ... and again before the second one does, by which time the first one has expired
    async with asyncio.timeout(IO_TIMEOUT):
        await calls[2].wait()
    assert datetime.now(UTC) > exp_of(tokens[0])

    await client.publish(TOPIC, b"after the first exp", idempotency_key="k-2")
    conn = a.h.connection_of(client)
    assert conn.session == session
    assert client.reconnects == 0
    assert conn.principal is not None
    assert conn.principal.token_expires_at is not None
    assert conn.principal.token_expires_at > exp_of(tokens[0])
    assert a.h.refusal("expired") is None
    assert (await a.h.counts(SUB)).ready == 2


# --------------------------------------------------------------------------------------------
# policy reload


#: svc-orders keeps only orders.eu.#, so loses orders.created
REVOKED = POLICY.replace(
    'topics = ["orders.#"]\nsubjects = ["svc-orders"]',
    'topics = ["orders.eu.#"]\nsubjects = ["svc-orders"]',
)
#: svc-orders keeps publish on orders.#, loses consume
PUBLISH_ONLY = POLICY.replace(
    'actions = ["publish", "consume"]\ntopics = ["orders.#"]',
    'actions = ["publish"]\ntopics = ["orders.#"]',
)


def test_policy_variants_differ_from_the_original() -> None:
    """The rewrites below change exactly what they claim to."""
    assert REVOKED != POLICY
    assert 'topics = ["orders.eu.#"]' in REVOKED
    assert PUBLISH_ONLY != POLICY
    assert 'actions = ["publish"]\ntopics = ["orders.#"]' in PUBLISH_ONLY


async def test_policy_reload_revokes_publish_on_a_live_connection(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    a = await auth_native()
    await make_queue(a.h, TOPIC, SUB)
    client = await a.connect(token=issuer.mint())
    await client.publish(TOPIC, b"granted", idempotency_key="k-1")  # cached as allowed
    assert a.policies.generation == 1

    issuer.write_policy(REVOKED)
    assert a.policies.reload() is True
    assert a.policies.generation == 2
    with pytest.raises(AuthorizationError):
        await client.publish(TOPIC, b"revoked", idempotency_key="k-2")
    assert a.h.denials == [
        (ORDERS_SVC, f"svc-orders: no rule grants publish on topic {TOPIC!r}"),
    ]
    assert await a.h.message_count() == 1

    # and back: the cache follows the generation both ways (through the SIGHUP path)
    issuer.write_policy(POLICY)
    assert a.auth.reload_policies() is True
    await client.publish(TOPIC, b"granted again", idempotency_key="k-3")
    assert (await a.h.counts(SUB)).ready == 2
    assert a.reasons() == []


async def test_policy_reload_stops_a_consumer_on_a_revoked_subscription(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    a = await auth_native()
    await make_queue(a.h, TOPIC, SUB)
    client = await a.connect(token=issuer.mint())
    await client.publish(TOPIC, b"one", idempotency_key="k-1")
    sub = client.consume(SUB, credit=10)
    first = await next_message(sub)
    assert first.payload == b"one"

    issuer.write_policy(PUBLISH_ONLY)  # svc-orders may still publish, no longer consume
    assert a.policies.reload() is True

    # The consumer re-checks its grant before every lease: the broker stops it with an ERROR
    # forbidden on its SUBSCRIBE request, which the SDK raises from the iterator.
    with pytest.raises(AuthorizationError) as caught:
        await next_message(sub)
    assert caught.value.message == f"consume on topic {TOPIC!r} is not permitted"
    assert a.h.consumers(SUB) == []
    # settling what it already holds needs the consume grant too
    with pytest.raises(AuthorizationError):
        await first.ack()

    # what is published from now on stays in the subscription, undelivered
    await client.publish(TOPIC, b"two", idempotency_key="k-2")
    counts = await a.h.counts(SUB)
    assert (counts.ready, counts.leased) == (1, 1)
    consume_denial = (
        f"svc-orders: no rule grants consume on topic {TOPIC!r} with subscription {SUB!r}"
    )
    assert [reason for _, reason in a.h.denials] == [consume_denial, consume_denial]
    # subscribing again is refused at once
    with pytest.raises(AuthorizationError):
        await next_message(client.consume(SUB))


BAD_POLICIES = {
    "invalid-toml": REVOKED + "\n[[rules]\n",
    "unknown-action": REVOKED.replace('actions = ["admin"]', 'actions = ["administer"]'),
    "rule-without-principal": REVOKED + '\n[[rules]]\nid = "x"\nactions = ["publish"]\n'
    'topics = ["#"]\n',
    "duplicate-rule-id": REVOKED + '\n[[rules]]\nid = "orders-service"\neffect = "deny"\n'
    'actions = ["publish"]\ntopics = ["#"]\nany_principal = true\n',
    "unsupported-version": REVOKED.replace("version = 1", "version = 2"),
}


@pytest.mark.parametrize("bad", BAD_POLICIES.values(), ids=BAD_POLICIES.keys())
async def test_bad_policy_on_reload_keeps_the_old_one(
    auth_native: AuthFactory,
    issuer: Issuer,
    bad: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each bad file would revoke svc-orders' publish grant if it were (partly) applied."""
    a = await auth_native()
    await make_queue(a.h, TOPIC, SUB)
    client = await a.connect(token=issuer.mint())
    await client.publish(TOPIC, b"before", idempotency_key="k-1")
    digest = a.policies.policy.digest

    issuer.write_policy(bad)
    with pytest.raises(PolicyError):
        a.policies.reload()
    with caplog.at_level(logging.ERROR, logger="securebroker.authz.service"):
        assert a.auth.reload_policies() is False
    assert any("policy not reloaded" in r.getMessage() for r in caplog.records)
    assert a.policies.generation == 1
    assert a.policies.policy.digest == digest

    await client.publish(TOPIC, b"still granted", idempotency_key="k-2")
    fresh = await a.connect(token=issuer.mint())
    await fresh.publish(TOPIC, b"new connection too", idempotency_key="k-3")
    assert (await a.h.counts(SUB)).ready == 3
    assert a.h.denials == []
