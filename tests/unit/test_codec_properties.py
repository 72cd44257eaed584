"""Properties of the codec under arbitrary chunking, garbage and mutation (hypothesis)."""

from __future__ import annotations

import itertools

import msgspec
from codec_helpers import (
    DEFAULT,
    client_frames,
    decoder_for,
    json_like,
    raw_frame,
    ready_decoder,
    server_frames,
    u32,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securebroker.errors import ProtocolError
from securebroker.protocol import (
    FRAME_TYPES,
    PREAMBLE,
    Envelope,
    Frame,
    FrameDecoder,
    Limits,
    encode,
    encode_many,
    validate,
)

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A small max_frame keeps garbage-driven buffering cheap while exercising the same code paths.
SMALL = Limits(max_frame=18_432, max_payload=1024, max_metadata=1024)


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
    again = ready_decoder("client" if envelope.frame.SENDER == "server" else "server", SMALL)
    assert again.feed(encode(envelope.frame, envelope.request_id)) == [envelope]


@FAST
@given(
    role=st.sampled_from(["server", "client"]),
    garbage=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
)
def test_garbage_only_raises_protocol_errors(role: str, garbage: bytes, cuts: list[int]) -> None:
    decoder = ready_decoder(role, SMALL)
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
    decoder = ready_decoder(role, SMALL)
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
    frame = raw_frame(frame_type, body)
    for role in ("server", "client"):
        decoder = ready_decoder(role, SMALL)
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
