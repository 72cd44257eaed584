"""Shared by the codec tests (``test_codec.py``, ``test_codec_properties.py``).

Frames of every type, as fixed samples (``SAMPLES``) and as hypothesis strategies
(``client_frames``, ``server_frames``), and decoders ready to read them. Imported by module name:
pytest puts this directory on ``sys.path`` (the test directories have no ``__init__.py``).
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st

from securebroker.protocol import (
    PREAMBLE,
    Ack,
    Admin,
    AdminResult,
    Auth,
    Close,
    Confirm,
    Confirmed,
    Credit,
    Deliver,
    Error,
    Extend,
    Extended,
    Frame,
    FrameDecoder,
    Hello,
    Limits,
    Nack,
    NackItem,
    Ok,
    Ping,
    Pong,
    Publish,
    PublishBatch,
    PublishItem,
    Settled,
    SettleItem,
    SettleResult,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Welcome,
)
from securebroker.protocol import frames as f
from securebroker.protocol.frames import MAX_FRAME

DEFAULT = Limits()

# --- decoders -------------------------------------------------------------------------------


def decoder_for(role: str, limits: Limits = DEFAULT) -> FrameDecoder:
    """A fresh decoder on ``role``'s side; a server-side one still expects the preamble."""
    return FrameDecoder(role="server" if role == "server" else "client", limits=limits)


def ready_decoder(role: str, limits: Limits = DEFAULT) -> FrameDecoder:
    """A decoder on ``role``'s side that expects frames next (a server-side one has had the
    preamble; a client-side one never gets one)."""
    decoder = decoder_for(role, limits)
    if role == "server":
        assert decoder.feed(PREAMBLE) == []
    return decoder


def raw_frame(frame_type: int, body: bytes, *, request_id: int = 1, flags: int = 0) -> bytes:
    """A frame header with the right length field for ``body``, then ``body`` as is."""
    return struct.pack(">IBBI", 6 + len(body), frame_type, flags, request_id) + body


# --- one sample of every frame type ---------------------------------------------------------

MID = "01938f3e-7c1a-7b4e-9d2f-3a5b6c7d8e9f"
LEASE = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"

ITEM = PublishItem(
    topic="payments.authorize",
    payload=b"\x00\x01card-token\xff",
    attributes={"region": "eu", "kind": "auth"},
    content_type="application/json",
    idempotency_key="order-42",
    ordering_key="customer-7",
    not_before_ms=1_700_000_000_000,
    expires_at_ms=1_700_000_600_000,
    trace_context={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
)

SAMPLES: list[Frame] = [
    Hello(client="securebroker-python/0.1", token="eyJhbGciOiJFUzI1NiJ9.e30.sig"),
    Hello(client="anonymous"),
    Welcome(
        version=1,
        server="securebroker/0.1",
        session="s-1",
        max_frame=MAX_FRAME,
        max_batch=1000,
        heartbeat_ms=15_000,
        principal="CN=orders,O=shop",
    ),
    Auth(token="eyJhbGciOiJFUzI1NiJ9.e30.sig2"),
    Ok(),
    Error(code=32, name="stale_lease", message="lease expired", retryable=False),
    Publish(message=ITEM),
    Publish(message=PublishItem(topic="t", payload=b"")),
    PublishBatch(messages=[ITEM, PublishItem(topic="orders.created", payload=b"{}")]),
    Confirm(results=[Confirmed(message_id=MID), Confirmed(message_id=MID, duplicate=True)]),
    Subscribe(subscription="payments.authorize.fraud", credit=100, lease_ms=30_000),
    Subscribe(subscription="ledger", credit=0),
    Subscribed(consumer=3),
    Credit(consumer=3, credit=50),
    Deliver(
        consumer=3,
        subscription="fraud",
        topic="payments.authorize",
        message_id=MID,
        lease_token=LEASE,
        lease_expires_ms=1_700_000_030_000,
        attempt=2,
        payload=b"\x00payload",
        attributes={"region": "eu"},
        content_type="application/json",
        idempotency_key="order-42",
        ordering_key="customer-7",
        published_ms=1_700_000_000_000,
        trace_context={"traceparent": "00-abc-def-01"},
    ),
    Ack(items=[SettleItem(subscription="fraud", message_id=MID, lease_token=LEASE)]),
    Nack(
        items=[
            NackItem(subscription="fraud", message_id=MID, lease_token=LEASE),
            NackItem(
                subscription="fraud", message_id=MID, lease_token=LEASE, error="boom", delay_ms=500
            ),
        ]
    ),
    Settled(
        results=[
            SettleResult(ok=True),
            SettleResult(ok=False, code=32, name="stale_lease", message="lease expired"),
        ]
    ),
    Extend(subscription="fraud", message_id=MID, lease_token=LEASE, lease_ms=60_000),
    Extended(lease_expires_ms=1_700_000_090_000),
    Unsubscribe(consumer=3),
    Ping(),
    Pong(),
    Admin(op="topics.create", args={"name": "payments.authorize", "partitions": [1, 2], "x": None}),
    AdminResult(result={"topics": ["a", "b"], "count": 2}),
    AdminResult(),
    Close(code=0, reason="bye"),
    f.Settle(
        settle_id="settle-abc",
        acks=[SettleItem(subscription="payments.worker", message_id=MID, lease_token=MID)],
        publish=[PublishItem(topic="payments.completed", payload=b"paid")],
    ),
    f.SettleConfirm(results=[Confirmed(message_id=MID)], duplicate=True),
]

# --- strategies for frames of every type ----------------------------------------------------

segment = st.text("abcXYZ019_-", min_size=1, max_size=6)
names = st.lists(segment, min_size=1, max_size=3).map(".".join)
ids = st.uuids().map(str)
text = st.text(max_size=20)
keys = st.text(min_size=1, max_size=12)
u32 = st.integers(0, 0xFFFF_FFFF)
epoch_ms = st.integers(0, 253_402_300_799_999)
duration_ms = st.integers(0, 2**31 - 1)
lease_ms = st.integers(1, 2**31 - 1)
attrs = st.dictionaries(keys, text, max_size=4)
payloads = st.binary(max_size=64)
json_like: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | text | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=10,
)

publish_items = st.builds(
    PublishItem,
    topic=names,
    payload=payloads,
    attributes=attrs,
    content_type=st.text(min_size=1, max_size=20),
    idempotency_key=st.none() | keys,
    ordering_key=st.none() | keys,
    not_before_ms=st.none() | epoch_ms,
    expires_at_ms=st.none() | epoch_ms,
    trace_context=st.dictionaries(keys, text, max_size=2),
)
settle_items = st.builds(SettleItem, subscription=names, message_id=ids, lease_token=ids)
nack_items = st.builds(
    NackItem,
    subscription=names,
    message_id=ids,
    lease_token=ids,
    error=text,
    delay_ms=st.none() | duration_ms,
)

client_frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, client=text, token=st.none() | keys),
    st.builds(Auth, token=keys),
    st.builds(Publish, message=publish_items),
    st.builds(PublishBatch, messages=st.lists(publish_items, min_size=1, max_size=3)),
    st.builds(
        Subscribe, subscription=names, credit=st.integers(0, 10_000), lease_ms=st.none() | lease_ms
    ),
    st.builds(Credit, consumer=u32, credit=st.integers(1, 10_000)),
    st.builds(Ack, items=st.lists(settle_items, min_size=1, max_size=3)),
    st.builds(Nack, items=st.lists(nack_items, min_size=1, max_size=3)),
    st.builds(Extend, subscription=names, message_id=ids, lease_token=ids, lease_ms=lease_ms),
    st.builds(Unsubscribe, consumer=u32),
    st.just(Ping()),
    st.just(Pong()),
    st.builds(Admin, op=names, args=st.dictionaries(text, json_like, max_size=3)),
    st.builds(Close, code=st.integers(0, 0xFFFF), reason=text),
    st.builds(
        f.Settle,
        settle_id=keys,
        acks=st.lists(settle_items, min_size=1, max_size=3),
        publish=st.lists(publish_items, max_size=2),
    ),
)

server_frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        Welcome,
        version=st.just(1),
        server=text,
        session=text,
        max_frame=u32,
        max_batch=u32,
        heartbeat_ms=duration_ms,
        principal=text,
    ),
    st.just(Ok()),
    st.builds(Error, code=st.integers(0, 0xFFFF), name=text, message=text, retryable=st.booleans()),
    st.builds(
        Confirm,
        results=st.lists(st.builds(Confirmed, message_id=ids, duplicate=st.booleans()), max_size=3),
    ),
    st.builds(Subscribed, consumer=u32),
    st.builds(
        Deliver,
        consumer=u32,
        subscription=names,
        topic=names,
        message_id=ids,
        lease_token=ids,
        lease_expires_ms=epoch_ms,
        attempt=st.integers(1, 0xFFFF_FFFF),
        payload=payloads,
        attributes=attrs,
        content_type=st.text(min_size=1, max_size=20),
        idempotency_key=st.none() | keys,
        ordering_key=st.none() | keys,
        published_ms=epoch_ms,
        trace_context=st.dictionaries(keys, text, max_size=2),
    ),
    st.builds(
        Settled,
        results=st.lists(
            st.builds(
                SettleResult,
                ok=st.booleans(),
                code=st.integers(0, 0xFFFF),
                name=text,
                message=text,
            ),
            max_size=3,
        ),
    ),
    st.builds(Extended, lease_expires_ms=epoch_ms),
    st.builds(AdminResult, result=json_like),
    st.just(Ping()),
    st.just(Close(code=1, reason="shutdown")),
    st.builds(
        f.SettleConfirm,
        results=st.lists(st.builds(Confirmed, message_id=ids, duplicate=st.booleans()), max_size=3),
        duplicate=st.booleans(),
    ),
)
