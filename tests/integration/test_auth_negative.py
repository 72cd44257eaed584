"""Bad tokens and forbidden operations over real mutual TLS, against the real NativeServer.

Authentication cases are a table: each token is presented twice, once through the SDK (the
client must see the opaque ``AuthenticationError`` -- or ``TokenExpired`` -- and nothing of the
reason) and once as raw bytes, HELLO and a PUBLISH pipelined behind it (the server must answer
with exactly one ERROR frame and process nothing after it). Each time the server must have
recorded the *specific* reason through ``on_refused``, and nothing may be stored.

Authorization cases authenticate fine and are then denied: the client sees ``forbidden``, the
server reports the deciding reason through ``on_denied``, and nothing is stored or delivered.
Positive controls guard each group: the same setup with a valid token or an allowed topic works.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from auth_fixtures import (
    ORDERS_SVC,
    AuthFactory,
    Issuer,
    auth_native_fixture,  # noqa: F401  (the auth_native fixture)
    compact,
    hmac_token,
    issuer_fixture,  # noqa: F401  (the issuer fixture)
)
from native_fixtures import (
    ADMIN,
    ADMIN_PRINCIPAL,
    CLIENT,
    CLIENT_PRINCIPAL,
    IO_TIMEOUT,
    NativeHarness,
    close_writer,
    make_queue,
    read_frames,
)

from securebroker.client import Client, Message, Subscription
from securebroker.core.model import PublishRequest
from securebroker.errors import AuthenticationError, AuthorizationError, TokenExpired
from securebroker.protocol import PREAMBLE, FrameDecoder, Hello, Publish, PublishItem, encode
from securebroker.protocol import frames as f

TOPIC = "orders.created"
SUB = "orders.created.worker"


# --------------------------------------------------------------------------------------------
# authentication


@dataclass(frozen=True)
class BadToken:
    id: str
    #: the token to present (None: no token at all)
    token: Callable[[Issuer], str | None]
    #: the exact reason the server must record (after "authentication failed: ")
    detail: str
    error: type[AuthenticationError] = AuthenticationError
    require_bound: bool = False


def _hours(n: float) -> datetime:
    return datetime.now(UTC) + timedelta(hours=n)


BAD_TOKENS = [
    BadToken(
        "alg-none",
        lambda i: compact({"alg": "none", "typ": "JWT", "kid": "k1"}, i.claims()),
        "token algorithm 'none' is not allowed",
    ),
    BadToken(
        "alg-none-uppercase",
        lambda i: compact({"alg": "NONE", "typ": "JWT", "kid": "k1"}, i.claims()),
        "token algorithm 'NONE' is not allowed",
    ),
    BadToken(
        # algorithm confusion: the verifier's own public key used as the HMAC secret
        "hs256-signed-with-public-key",
        lambda i: hmac_token(
            {"alg": "HS256", "typ": "JWT", "kid": "k1"}, i.claims(), i.keys["k1"].public_pem
        ),
        "token algorithm 'HS256' is not allowed",
    ),
    BadToken(
        "hs256-signed-with-ec-public-key",
        lambda i: hmac_token(
            {"alg": "HS256", "typ": "JWT", "kid": "k2"}, i.claims(), i.keys["k2"].public_pem
        ),
        "token algorithm 'HS256' is not allowed",
    ),
    BadToken(
        # a JSON header may carry anything: the verifier must not trip over an unhashable alg
        "alg-not-a-string",
        lambda i: compact({"alg": ["EdDSA"], "kid": "k1"}, i.claims(), b"x" * 64),
        "token algorithm \"['EdDSA']\" is not allowed",
    ),
    BadToken("no-kid", lambda i: compact({"alg": "EdDSA"}, i.claims(), b"x"), "token has no kid"),
    BadToken(
        "unknown-kid",
        lambda i: i.mint(kid="k9", sign_with="rogue"),
        "unknown kid 'k9'",
    ),
    BadToken(
        "key-b-claims-kid-k1",
        lambda i: i.mint(kid="k1", sign_with="k2"),
        "token algorithm 'ES256' does not fit key 'k1'",
    ),
    BadToken(
        "unpublished-key-claims-kid-k1",
        lambda i: i.mint(kid="k1", sign_with="rogue"),
        "bad signature (kid 'k1')",
    ),
    BadToken(
        "payload-tampered-after-signing",
        lambda i: _swap_payload(i.mint(), i.claims(sub="svc-payments")),
        "bad signature (kid 'k1')",
    ),
    BadToken(
        "wrong-issuer",
        lambda i: i.mint(extra={"iss": "https://evil.test"}),
        "wrong issuer",
    ),
    BadToken(
        "wrong-audience",
        lambda i: i.mint(extra={"aud": "another-service"}),
        "wrong audience",
    ),
    BadToken(
        "expired",
        lambda i: i.mint(now=_hours(-2), lifetime=timedelta(hours=1)),
        "token expired",
        error=TokenExpired,
    ),
    BadToken(
        "nbf-in-the-future",
        lambda i: i.mint(extra={"nbf": int(_hours(1).timestamp())}),
        "token not yet valid (nbf or iat in the future)",
    ),
    BadToken(
        "iat-in-the-future",
        lambda i: i.mint(now=_hours(1)),
        "token not yet valid (nbf or iat in the future)",
    ),
    BadToken("missing-sub", lambda i: i.mint(drop=["sub"]), "token lacks the 'sub' claim"),
    BadToken("missing-exp", lambda i: i.mint(drop=["exp"]), "token lacks the 'exp' claim"),
    BadToken("missing-iat", lambda i: i.mint(drop=["iat"]), "token lacks the 'iat' claim"),
    BadToken("missing-iss", lambda i: i.mint(drop=["iss"]), "token lacks the 'iss' claim"),
    BadToken("missing-aud", lambda i: i.mint(drop=["aud"]), "token lacks the 'aud' claim"),
    BadToken("empty-sub", lambda i: i.mint(subject=""), "sub must be a non-empty string"),
    BadToken(
        "lifetime-longer-than-allowed",
        lambda i: i.mint(lifetime=timedelta(hours=25)),
        "token lifetime exceeds auth.max_token_lifetime_seconds",
    ),
    BadToken(
        # bound to other-client's certificate, presented over dev-client's
        "bound-to-another-certificate",
        lambda i: i.mint(bind="other-client"),
        "token is bound to another certificate",
    ),
    BadToken(
        "cnf-not-an-object",
        lambda i: i.mint(extra={"cnf": "x5t"}),
        "cnf claim is not an object",
    ),
    BadToken(
        "unbound-where-binding-is-required",
        lambda i: i.mint(bind=None),
        "unbound token where certificate binding is required",
        require_bound=True,
    ),
    BadToken("garbage", lambda i: "definitely-not-a-jwt", "malformed token"),
    BadToken("header-not-json", lambda i: "bm90LWpzb24.e30.c2ln", "malformed token"),
    BadToken("no-token", lambda i: None, "no token presented (auth.require_token is on)"),
]


def _swap_payload(token: str, claims: dict[str, object]) -> str:
    """The token's header and signature around another payload."""
    head, _body, sig = token.split(".")
    _, forged, _ = compact({}, claims).split(".")
    return f"{head}.{forged}.{sig}"


async def hello_then_publish(
    h: NativeHarness, token: str | None, *, count: int | None = None
) -> list[tuple[int, f.Frame]]:
    """HELLO with ``token`` and a PUBLISH pipelined right behind it, in one write; the frames
    the server sends until it closes the connection (or until ``count`` arrived)."""
    reader, writer = await h.open_raw(CLIENT)
    try:
        item = PublishItem(topic=TOPIC, payload=b"raw", idempotency_key="raw")
        writer.write(
            PREAMBLE
            + encode(Hello(client="raw-test", token=token), 1)
            + encode(Publish(message=item), 2)
        )
        return await read_frames(reader, FrameDecoder(role="client"), count=count)
    finally:
        await close_writer(writer)


async def test_valid_token_is_accepted(auth_native: AuthFactory, issuer: Issuer) -> None:
    """Guards the table below: the same setup with a good token connects and publishes."""
    a = await auth_native(require_bound=True)
    await make_queue(a.h, TOPIC, SUB)
    client = await a.connect(token=issuer.mint())
    assert client.principal == ORDERS_SVC
    await client.publish(TOPIC, b"fine", idempotency_key="ok")
    assert await a.h.message_count() == 1
    # the raw path with a good token gets WELCOME and the CONFIRM of the pipelined publish
    frames = await hello_then_publish(a.h, issuer.mint(), count=2)
    assert [type(fr) for _, fr in frames] == [f.Welcome, f.Confirm]
    assert await a.h.message_count() == 2
    assert a.reasons() == []
    assert a.h.denials == []


@pytest.mark.parametrize("case", BAD_TOKENS, ids=lambda c: c.id)
async def test_bad_token_is_refused(
    auth_native: AuthFactory, issuer: Issuer, case: BadToken
) -> None:
    a = await auth_native(require_bound=case.require_bound)
    await make_queue(a.h, TOPIC, SUB)
    token = case.token(issuer)
    opaque = "token expired" if case.error is TokenExpired else "authentication failed"

    # 1. the SDK: the catalogue error, opaque, without the reason
    with pytest.raises(AuthenticationError) as caught:
        await a.connect(token=token)
    err = caught.value
    assert type(err) is case.error
    assert err.wire == case.error.wire
    assert err.message == opaque
    assert err.detail is None
    if case.error is not TokenExpired:
        assert case.detail.lower() not in str(err).lower()
    # recorded before the ERROR frame was sent, so already there
    expected = f"authentication failed: {case.detail}"
    assert a.reasons() == [expected]

    # 2. raw bytes: exactly one ERROR (request 1), then the connection ends; the pipelined
    # PUBLISH is never processed
    frames = await hello_then_publish(a.h, token)
    assert frames == [
        (1, f.Error(code=case.error.wire, name=case.error.code, message=opaque, retryable=False))
    ]
    assert a.reasons() == [expected, expected]

    assert await a.h.message_count() == 0
    assert (await a.h.counts(SUB)).ready == 0
    assert a.h.denials == []


# --------------------------------------------------------------------------------------------
# authorization


async def next_message(sub: Subscription) -> Message:
    async with asyncio.timeout(IO_TIMEOUT):
        return await anext(sub)


async def publish_directly(h: NativeHarness, topic: str, payload: bytes) -> None:
    """Store a message without going through the front door (no authorization involved)."""
    await h.broker.publish(PublishRequest(topic, payload, idempotency_key=f"direct-{payload!r}"))


async def test_allowed_publish_and_consume_work(auth_native: AuthFactory, issuer: Issuer) -> None:
    """Positive control for every denial below."""
    a = await auth_native()
    await make_queue(a.h, TOPIC, SUB)
    client = await a.connect(token=issuer.mint())
    result = await client.publish(TOPIC, b"order 1", idempotency_key="o-1")
    assert await a.h.message_count() == 1
    message = await next_message(client.consume(SUB))
    assert message.id == result.message_id
    assert message.payload == b"order 1"
    await message.ack()
    counts = await a.h.counts(SUB)
    assert (counts.ready, counts.leased) == (0, 0)
    assert a.h.denials == []


async def test_publish_outside_the_grant_is_forbidden(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    a = await auth_native()
    await make_queue(a.h, "payments.card", "payments.card.ledger")
    await make_queue(a.h, TOPIC, SUB)
    client = await a.connect(token=issuer.mint())
    with pytest.raises(AuthorizationError) as caught:
        await client.publish("payments.card", b"nope", idempotency_key="p-1")
    assert caught.value.wire == 51
    assert caught.value.message == "publish on topic 'payments.card' is not permitted"
    assert a.h.denials == [
        (ORDERS_SVC, "svc-orders: no rule grants publish on topic 'payments.card'")
    ]
    assert await a.h.message_count() == 0
    # a denial is per request: the connection stays usable for what is granted
    await client.publish(TOPIC, b"allowed", idempotency_key="o-1")
    assert (await a.h.counts(SUB)).ready == 1
    assert (await a.h.counts("payments.card.ledger")).ready == 0
    assert len(a.h.denials) == 1


async def test_explicit_deny_wins_under_an_allowed_wildcard(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    """``orders.#`` grants svc-orders ``orders.internal.audit``, but the deny rule wins; it
    covers publish only, so consuming from the same topic stays allowed."""
    a = await auth_native()
    await make_queue(a.h, "orders.internal.audit", "orders.internal.audit.log")
    client = await a.connect(token=issuer.mint())
    for topic in ("orders.internal.audit", "orders.internal"):
        with pytest.raises(AuthorizationError):
            await client.publish(topic, b"nope")
    assert a.h.denials == [
        (ORDERS_SVC, "svc-orders: denied by rule 'no-internal-orders'"),
        (ORDERS_SVC, "svc-orders: denied by rule 'no-internal-orders'"),
    ]
    assert await a.h.message_count() == 0

    await publish_directly(a.h, "orders.internal.audit", b"internal")
    message = await next_message(client.consume("orders.internal.audit.log"))
    assert message.payload == b"internal"
    assert len(a.h.denials) == 2


async def test_consume_outside_the_grant_is_forbidden(
    auth_native: AuthFactory, issuer: Issuer
) -> None:
    a = await auth_native()
    await make_queue(a.h, "payments.card", "payments.card.audit")
    await publish_directly(a.h, "payments.card", b"secret")
    client = await a.connect(token=issuer.mint())
    sub = client.consume("payments.card.audit")
    with pytest.raises(AuthorizationError) as caught:
        await next_message(sub)
    assert caught.value.message == "consume on topic 'payments.card' is not permitted"
    assert a.h.denials == [
        (
            ORDERS_SVC,
            "svc-orders: no rule grants consume on topic 'payments.card' "
            "with subscription 'payments.card.audit'",
        )
    ]
    assert a.h.consumers("payments.card.audit") == []
    counts = await a.h.counts("payments.card.audit")
    assert (counts.ready, counts.leased) == (1, 0)


# (principal's token kwargs, action, topic, allowed)
AUDITOR = {"subject": "audit-bot", "roles": ["auditor"]}
ORDERS = {"subject": ORDERS_SVC}
WILDCARDS = [
    ("orders-hash-matches-orders-itself", ORDERS, "publish", "orders", True),
    ("orders-hash-matches-two-levels", ORDERS, "publish", "orders.eu.x", True),
    ("orders-hash-no-prefix-match", ORDERS, "publish", "orders-archive", False),
    ("orders-hash-is-case-sensitive", ORDERS, "publish", "Orders.eu", False),
    ("payments-star-matches-one-level", AUDITOR, "consume", "payments.card", True),
    ("payments-star-not-zero-levels", AUDITOR, "consume", "payments", False),
    ("payments-star-not-two-levels", AUDITOR, "consume", "payments.card.x", False),
    ("auditor-cannot-publish-payments", AUDITOR, "publish", "payments.card", False),
]


@pytest.mark.parametrize(
    ("who", "action", "topic", "allowed"),
    [w[1:] for w in WILDCARDS],
    ids=[w[0] for w in WILDCARDS],
)
async def test_wildcard_edges(
    auth_native: AuthFactory,
    issuer: Issuer,
    who: dict[str, Any],
    action: str,
    topic: str,
    allowed: bool,
) -> None:
    a = await auth_native()
    sub = f"{topic}.reader"
    await make_queue(a.h, topic, sub)
    client = await a.connect(token=issuer.mint(**who))
    subject = str(who["subject"])
    if action == "publish":
        attempt = client.publish(topic, b"m", idempotency_key="w-1")
    else:
        await publish_directly(a.h, topic, b"m")
        attempt = next_message(client.consume(sub))
    if allowed:
        await attempt
        assert a.h.denials == []
        assert await a.h.message_count() == 1
    else:
        with pytest.raises(AuthorizationError):
            await attempt
        what = f"{action} on topic {topic!r}"
        if action == "consume":
            what += f" with subscription {sub!r}"
        assert a.h.denials == [(subject, f"{subject}: no rule grants {what}")]
        counts = await a.h.counts(sub)
        # denied publish: nothing stored; denied consume: the message stays, undelivered
        assert (counts.ready, counts.leased) == ((1, 0) if action == "consume" else (0, 0))


async def _topic_names(client: Client) -> list[str]:
    return sorted(t["name"] for t in await client.admin("topic.list"))


async def test_admin_requires_an_admin_grant(auth_native: AuthFactory, issuer: Issuer) -> None:
    a = await auth_native()
    for topic in ("orders.created", "orders.internal.audit", "payments.card"):
        await make_queue(a.h, topic, f"{topic}.worker")

    # svc-orders may publish and consume orders.#, but administer nothing
    plain = await a.connect(token=issuer.mint())
    with pytest.raises(AuthorizationError) as caught:
        await plain.admin("topic.create", name="orders.new")
    assert caught.value.message == "admin on topic 'orders.new' is not permitted"
    with pytest.raises(AuthorizationError):
        await plain.admin("subscription.purge", name="orders.created.worker")
    assert await _topic_names(plain) == []  # list ops filter to what it may administer
    assert await plain.admin("subscription.list") == []
    assert a.h.denials == [
        (ORDERS_SVC, "svc-orders: no rule grants admin on topic 'orders.new'"),
        (
            ORDERS_SVC,
            "svc-orders: no rule grants admin on topic 'orders.created' "
            "with subscription 'orders.created.worker'",
        ),
    ]

    # with the orders-admin role: orders.# only
    admin = await a.connect(token=issuer.mint(roles=["orders-admin"]))
    assert await _topic_names(admin) == ["orders.created", "orders.internal.audit"]
    subs = sorted(s["name"] for s in await admin.admin("subscription.list"))
    assert subs == ["orders.created.worker", "orders.internal.audit.worker"]
    with pytest.raises(AuthorizationError):
        await admin.admin("topic.create", name="payments.new")
    with pytest.raises(AuthorizationError):
        await admin.admin("topic.delete", name="payments.card", force=True)
    created = await admin.admin("topic.create", name="orders.new")
    assert created["name"] == "orders.new"
    names = sorted(t.name for t in await a.h.broker.list_topics())
    assert names == ["orders.created", "orders.internal.audit", "orders.new", "payments.card"]


async def test_certificate_only_rules(auth_native: AuthFactory, issuer: Issuer) -> None:
    """With tokens optional, a certificate-only principal gets what ``certificates`` rules
    grant, never what subject/role rules grant, and the explicit deny applies to it too."""
    a = await auth_native(require_token=False)
    await make_queue(a.h, "payments.card", "payments.card.ledger")
    await make_queue(a.h, "orders.internal.x", "orders.internal.x.log")
    await make_queue(a.h, TOPIC, SUB)

    cert_admin = await a.connect(ADMIN)
    assert cert_admin.principal == ADMIN_PRINCIPAL
    await cert_admin.publish("payments.card", b"by certificate", idempotency_key="c-1")
    assert await _topic_names(cert_admin) == ["orders.internal.x", "payments.card"]
    with pytest.raises(AuthorizationError):
        await cert_admin.publish(TOPIC, b"not granted")
    with pytest.raises(AuthorizationError):  # granted by its rule, but the deny wins
        await cert_admin.publish("orders.internal.x", b"denied for everyone")
    await publish_directly(a.h, "orders.internal.x", b"internal")
    message = await next_message(cert_admin.consume("orders.internal.x.log"))
    assert message.payload == b"internal"  # the deny covers publish only

    cert_client = await a.connect(CLIENT)
    assert cert_client.principal == CLIENT_PRINCIPAL
    with pytest.raises(AuthorizationError):  # the subjects rule needs a token
        await cert_client.publish(TOPIC, b"no token, no subject")

    assert a.h.denials == [
        (ADMIN_PRINCIPAL, f"{ADMIN_PRINCIPAL}: no rule grants publish on topic {TOPIC!r}"),
        (ADMIN_PRINCIPAL, f"{ADMIN_PRINCIPAL}: denied by rule 'no-internal-orders'"),
        (CLIENT_PRINCIPAL, f"{CLIENT_PRINCIPAL}: no rule grants publish on topic {TOPIC!r}"),
    ]
    assert await a.h.message_count() == 2  # the granted publish and the direct one
    assert (await a.h.counts("payments.card.ledger")).ready == 1
