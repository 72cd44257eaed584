"""Properties of the codec under arbitrary chunking, garbage and mutation (hypothesis)."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securebroker.errors import ProtocolError
from securebroker.protocol import (
    FRAME_TYPES,
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
    Envelope,
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
    encode,
    encode_many,
    validate,
)

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DEFAULT = Limits()
# A small max_frame keeps garbage-driven buffering cheap while exercising the same code paths.
SMALL = Limits(max_frame=18_432, max_payload=1024, max_metadata=1024)

# --- field strategies -----------------------------------------------------------------------

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
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, list[tuple[Frame, int]], bytes]:
    """A role, the frames its peer sends with request ids, and the encoded byte stream."""
    role = draw(st.sampled_from(["server", "client"]))
    frames = client_frames if role == "server" else server_frames
    items = draw(st.lists(st.tuples(frames, u32), max_size=8))
    wire = encode_many(items)
    return role, items, (PREAMBLE + wire if role == "server" else wire)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def decoder_for(role: str, limits: Limits = DEFAULT) -> FrameDecoder:
    return FrameDecoder(role="server" if role == "server" else "client", limits=limits)


def feed_all(decoder: FrameDecoder, chunks: list[bytes], limit: int) -> list[Envelope]:
    got: list[Envelope] = []
    for chunk in chunks:
        got += decoder.feed(chunk)
        assert decoder.buffered <= limit
    return got


# --- properties -----------------------------------------------------------------------------


@FAST
@given(stream=streams(), cuts=st.lists(st.integers(0, 10**6), max_size=20))
def test_any_chunking_decodes_the_same_envelopes(
    stream: tuple[str, list[tuple[Frame, int]], bytes], cuts: list[int]
) -> None:
    role, items, wire = stream
    expected = [Envelope(rid, frame) for frame, rid in items]
    got = feed_all(decoder_for(role), chunked(wire, cuts), DEFAULT.max_frame + 9)
    assert got == expected


@settings(max_examples=40, deadline=None)
@given(stream=streams())
def test_byte_at_a_time_and_every_single_split(
    stream: tuple[str, list[tuple[Frame, int]], bytes],
) -> None:
    role, items, wire = stream
    expected = [Envelope(rid, frame) for frame, rid in items]
    assert feed_all(decoder_for(role), [wire[i : i + 1] for i in range(len(wire))], 2**21) == (
        expected
    )
    step = max(1, len(wire) // 25)  # bounded work per example
    for split in range(0, len(wire) + 1, step):
        decoder = decoder_for(role)
        assert decoder.feed(wire[:split]) + decoder.feed(wire[split:]) == expected


def _valid(envelope: Envelope) -> None:
    """A decoded frame is well-formed: it passes validation and re-encodes to itself."""
    validate(envelope.frame, SMALL)
    if envelope.frame.SENDER == "server":
        again = decoder_for("client", SMALL)
    else:
        again = decoder_for("server", SMALL)
        again.feed(PREAMBLE)
    assert again.feed(encode(envelope.frame, envelope.request_id)) == [envelope]


@FAST
@given(
    role=st.sampled_from(["server", "client"]),
    garbage=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
)
def test_garbage_only_raises_protocol_errors(role: str, garbage: bytes, cuts: list[int]) -> None:
    decoder = decoder_for(role, SMALL)
    if role == "server":
        decoder.feed(PREAMBLE)
    try:
        for env in feed_all(decoder, chunked(garbage, cuts), SMALL.max_frame + 9):
            _valid(env)
    except ProtocolError:
        assert decoder.buffered == 0


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """Well-framed frames with plausible headers and arbitrary bodies (gets past framing)."""
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        body = draw(st.binary(max_size=200))
        frame_type = draw(st.integers(0, 30))
        flags = draw(st.sampled_from([0, 0, 0, 1, 128]))
        rid = draw(u32)
        length = len(body) + 6
        if draw(st.integers(0, 9)) == 0:
            length = draw(st.integers(0, 2**32 - 1))
        parts.append(
            length.to_bytes(4, "big") + bytes([frame_type, flags]) + rid.to_bytes(4, "big") + body
        )
    return b"".join(parts)


@FAST
@given(role=st.sampled_from(["server", "client"]), garbage=framed_garbage())
def test_framed_garbage_only_raises_protocol_errors(role: str, garbage: bytes) -> None:
    decoder = decoder_for(role, SMALL)
    if role == "server":
        decoder.feed(PREAMBLE)
    try:
        for env in feed_all(decoder, [garbage], SMALL.max_frame + 9):
            _valid(env)
    except ProtocolError:
        assert decoder.buffered == 0


@st.composite
def plausible_bodies(draw: st.DrawFn) -> tuple[int, bytes]:
    """A known frame type and a MessagePack map using its field names with arbitrary values."""
    frame_type = draw(st.sampled_from(sorted(FRAME_TYPES)))
    names = list(msgspec.structs.fields(FRAME_TYPES[frame_type]))
    field_names = [f.encode_name for f in names] + ["message", "items", "topic", "payload"]
    body = draw(st.dictionaries(st.sampled_from(field_names), json_like, max_size=len(field_names)))
    return frame_type, msgspec.msgpack.encode(body)


@FAST
@given(typed=plausible_bodies())
def test_plausible_bodies_only_raise_protocol_errors(typed: tuple[int, bytes]) -> None:
    frame_type, body = typed
    frame = struct.pack(">IBBI", len(body) + 6, frame_type, 0, 1) + body
    for role in ("server", "client"):
        decoder = decoder_for(role, SMALL)
        if role == "server":
            decoder.feed(PREAMBLE)
        try:
            for env in decoder.feed(frame):
                _valid(env)
        except ProtocolError:
            assert decoder.buffered == 0


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, list[Envelope], bytes, int]:
    """A valid stream, then a mutated copy and the offset of the first changed byte."""
    role, items, wire = draw(streams())
    data = bytearray(wire)
    if not data:
        data = bytearray(PREAMBLE if role == "server" else b"")
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "truncate":
        del data[at:]
    elif kind == "flip" and data:
        count = draw(st.integers(1, 4))
        for i in range(at, min(len(data), at + count)):
            data[i] ^= draw(st.integers(1, 255))
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=8))
    elif data:
        del data[at : at + draw(st.integers(1, 8))]
    return role, [Envelope(rid, f) for f, rid in items], bytes(data), at


@FAST
@given(mutated=mutations(), cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_mutations_yield_valid_frames_or_protocol_error(
    mutated: tuple[str, list[Envelope], bytes, int], cuts: list[int]
) -> None:
    role, original, data, at = mutated
    decoder = decoder_for(role)
    got: list[Envelope] = []
    try:
        for chunk in chunked(data, cuts):
            got += decoder.feed(chunk)
            assert decoder.buffered <= DEFAULT.max_frame + 9
    except ProtocolError:
        assert decoder.buffered == 0
    for env in got:
        validate(env.frame, DEFAULT)
    # Frames wholly before the first changed byte come out unchanged.
    offset = len(PREAMBLE) if role == "server" else 0
    intact = 0
    for env in original:
        offset += len(encode(env.frame, env.request_id))
        if offset > at:
            break
        intact += 1
    n = min(intact, len(got))
    assert got[:n] == original[:n]
