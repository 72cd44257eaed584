"""The native protocol's sans-I/O codec: framing, preamble, limits and bad input (no sockets)."""

from __future__ import annotations

import array
import struct

import msgspec
import pytest
from codec_helpers import ITEM, LEASE, MID, SAMPLES, raw_frame, ready_decoder

from securebroker.errors import ConfigError, FrameTooLarge, ProtocolError, UnsupportedVersion
from securebroker.protocol import (
    FRAME_TYPES,
    PREAMBLE,
    Ack,
    Auth,
    Close,
    Credit,
    Deliver,
    Envelope,
    Extend,
    Frame,
    FrameDecoder,
    Hello,
    Limits,
    Ping,
    Pong,
    Publish,
    PublishBatch,
    PublishItem,
    SettleItem,
    Subscribe,
    Unsubscribe,
    encode,
    encode_many,
    validate,
)
from securebroker.protocol.frames import MAX_FRAME, MAX_METADATA, MAX_PAYLOAD


def server() -> FrameDecoder:
    """A server-side decoder that has already seen the preamble."""
    return ready_decoder("server")


def receiver_for(frame: Frame) -> FrameDecoder:
    return ready_decoder("server" if frame.SENDER == "client" else "client")


def publish_with(**changes: object) -> bytes:
    fields = {"topic": "payments.authorize", "payload": b"x", **changes}
    return encode(Publish(message=PublishItem(**fields)), 1)  # type: ignore[arg-type]


# --- round trips ----------------------------------------------------------------------------


def test_samples_cover_every_frame_type() -> None:
    assert {type(f) for f in SAMPLES} == set(FRAME_TYPES.values())
    assert sorted(FRAME_TYPES) == list(range(1, 26))


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: f.NAME)
def test_round_trip(frame: Frame) -> None:
    wire = encode(frame, 12345)
    assert receiver_for(frame).feed(wire) == [Envelope(12345, frame)]
    if frame.SENDER == "both":
        assert server().feed(wire) == [Envelope(12345, frame)]


def test_header_layout() -> None:
    wire = encode(Ping(), 0x01020304)
    # length 7 = type + flags + request id + the empty map 0x80
    assert wire == b"\x00\x00\x00\x07\x13\x00\x01\x02\x03\x04\x80"
    assert PREAMBLE == b"SBRK\x00\x01\r\n"


def test_defaults_are_omitted_on_the_wire() -> None:
    body = encode(Publish(message=PublishItem(topic="t", payload=b"p")))[10:]
    assert msgspec.msgpack.decode(body) == {"message": {"topic": "t", "payload": b"p"}}


def test_request_id_bounds() -> None:
    assert server().feed(encode(Ping(), 0xFFFF_FFFF))[0].request_id == 0xFFFF_FFFF
    with pytest.raises(ValueError, match="request_id"):
        encode(Ping(), 2**32)
    with pytest.raises(ValueError, match="request_id"):
        encode(Ping(), -1)
    with pytest.raises(ValueError, match="request_id"):
        encode_many([(Ping(), 1), (Ping(), 2**32)])


def test_encode_many_is_concatenation() -> None:
    items = [(f, i) for i, f in enumerate(SAMPLES)]
    assert encode_many(items) == b"".join(encode(f, i) for f, i in items)
    assert encode_many([]) == b""


def test_several_frames_in_one_feed_with_preamble() -> None:
    frames: list[Frame] = [Hello(client="c"), Publish(message=ITEM), Ping()]
    wire = PREAMBLE + encode_many((f, i + 1) for i, f in enumerate(frames))
    decoder = FrameDecoder(role="server")
    assert decoder.feed(wire) == [Envelope(i + 1, f) for i, f in enumerate(frames)]
    assert decoder.buffered == 0


def test_accepts_bytearray_and_memoryview_of_any_format() -> None:
    wire = encode(Ping(), 9) + encode(Pong(), 10)
    assert len(FrameDecoder(role="client").feed(bytearray(wire))) == 2
    assert len(FrameDecoder(role="client").feed(memoryview(wire))) == 2
    padded = wire + b"\x00" * (-len(wire) % 4)
    words = array.array("I", padded)
    decoder = FrameDecoder(role="client")
    assert len(decoder.feed(memoryview(words))) == 2
    assert decoder.buffered == len(padded) - len(wire)


def test_caller_buffer_is_not_retained() -> None:
    buf = bytearray(encode(Ping(), 1) + encode(Pong(), 2)[:5])
    decoder = FrameDecoder(role="client")
    assert len(decoder.feed(buf)) == 1
    buf.clear()  # would raise BufferError if the decoder still held a view on it
    buf += encode(Pong(), 2)[5:]
    assert decoder.feed(buf) == [Envelope(2, Pong())]


def test_decoded_payload_does_not_alias_the_input() -> None:
    buf = bytearray(encode(Publish(message=PublishItem(topic="t", payload=b"abc")), 1))
    (env,) = server().feed(buf)
    buf[:] = b"\x00" * len(buf)
    assert isinstance(env.frame, Publish)
    assert env.frame.message.payload == b"abc"


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    body = msgspec.msgpack.encode({"consumer": 4, "added_in_v1_1": [1, 2, 3]})
    assert server().feed(raw_frame(18, body)) == [Envelope(1, Unsubscribe(consumer=4))]


# --- preamble -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello sent to plaintext
        b"\x00\x00\x00\x07\x13\x00\x00\x00\x00\x01\x80",  # a frame without the preamble
        b"SBRK\x00\x01\n\n",  # right magic and version, mangled line ending
        b"sbrk\x00\x01\r\n",
    ],
)
def test_bad_preamble(first_bytes: bytes) -> None:
    decoder = FrameDecoder(role="server")
    with pytest.raises(ProtocolError, match=r"^bad preamble: not a securebroker client$") as info:
        decoder.feed(first_bytes)
    assert type(info.value) is ProtocolError


def test_bad_preamble_fails_at_the_first_wrong_byte() -> None:
    decoder = FrameDecoder(role="server")
    with pytest.raises(ProtocolError, match="bad preamble"):
        decoder.feed(b"G")
    decoder = FrameDecoder(role="server")
    assert decoder.feed(b"SBR") == []
    with pytest.raises(ProtocolError, match="bad preamble"):
        decoder.feed(b"X")


@pytest.mark.parametrize("version", [b"\x00\x02", b"\x00\x00", b"\x01\x00", b"\xff\xff"])
def test_wrong_version(version: bytes) -> None:
    decoder = FrameDecoder(role="server")
    with pytest.raises(UnsupportedVersion, match="version"):
        decoder.feed(b"SBRK" + version + b"\r\n" + encode(Ping()))


def test_preamble_byte_by_byte() -> None:
    decoder = FrameDecoder(role="server")
    for byte in PREAMBLE:
        assert decoder.feed(bytes([byte])) == []
    assert decoder.buffered == 0
    assert decoder.feed(encode(Ping(), 5)) == [Envelope(5, Ping())]


def test_client_decoder_expects_no_preamble() -> None:
    assert FrameDecoder(role="client").feed(encode(Pong(), 1)) == [Envelope(1, Pong())]
    with pytest.raises(FrameTooLarge):  # "SBRK" read as a length field
        FrameDecoder(role="client").feed(PREAMBLE)


def test_invalid_role() -> None:
    with pytest.raises(ValueError, match="role"):
        FrameDecoder(role="proxy")  # type: ignore[arg-type]


# --- framing --------------------------------------------------------------------------------


def test_truncated_frame_waits_then_completes() -> None:
    wire = encode(Publish(message=ITEM), 77)
    decoder = server()
    for cut in (1, 3, 4, 9, 10, len(wire) - 1):
        decoder = server()
        assert decoder.feed(wire[:cut]) == []
        assert decoder.buffered == cut
        assert decoder.feed(wire[cut:]) == [Envelope(77, Publish(message=ITEM))]
        assert decoder.buffered == 0


def test_one_byte_at_a_time() -> None:
    frames = [(f, i) for i, f in enumerate(SAMPLES) if f.SENDER != "client"]
    wire = encode_many(frames)
    decoder = FrameDecoder(role="client")
    got: list[Envelope] = []
    for i in range(len(wire)):
        got += decoder.feed(wire[i : i + 1])
    assert got == [Envelope(i, f) for f, i in frames]


@pytest.mark.parametrize("split", [False, True])
def test_oversized_length_rejected_after_four_bytes(split: bool) -> None:
    decoder = server()
    if split:
        assert decoder.feed(b"\xff\xff") == []
        assert decoder.buffered == 2
        chunk = b"\xff\xff"
    else:
        chunk = b"\xff\xff\xff\xff"
    with pytest.raises(FrameTooLarge, match="4294967295"):
        decoder.feed(chunk)
    assert decoder.buffered == 0


def test_length_limit_is_exact() -> None:
    at_limit = struct.pack(">IBBI", MAX_FRAME, 6, 0, 1)
    decoder = server()
    assert decoder.feed(at_limit) == []  # waits for the body, nothing allocated beyond it
    assert decoder.buffered == 10
    with pytest.raises(FrameTooLarge):
        server().feed(struct.pack(">I", MAX_FRAME + 1))
    small = Limits(max_payload=1024, max_metadata=1024, max_frame=20_000)
    with pytest.raises(FrameTooLarge, match="20000"):
        FrameDecoder(role="client", limits=small).feed(struct.pack(">I", 20_001))


def test_buffered_is_bounded_while_a_large_frame_arrives() -> None:
    frame = Publish(message=PublishItem(topic="t", payload=b"p" * MAX_PAYLOAD))
    wire = encode(frame, 1) + encode(Ping(), 2)
    decoder = server()
    got: list[Envelope] = []
    for i in range(0, len(wire), 65_536):
        got += decoder.feed(wire[i : i + 65_536])
        assert decoder.buffered <= MAX_FRAME + 9
    assert got == [Envelope(1, frame), Envelope(2, Ping())]


@pytest.mark.parametrize("length", [0, 1, 5])
def test_length_below_minimum(length: int) -> None:
    with pytest.raises(ProtocolError, match="minimum") as info:
        server().feed(struct.pack(">I", length) + b"\x00" * 10)
    assert not isinstance(info.value, FrameTooLarge)


@pytest.mark.parametrize("frame_type", [0, 26, 99, 255])
def test_unknown_frame_type(frame_type: int) -> None:
    with pytest.raises(ProtocolError, match=rf"unknown frame type {frame_type}\b"):
        server().feed(raw_frame(frame_type, b"\x80"))


def test_frame_from_the_wrong_side() -> None:
    with pytest.raises(
        ProtocolError, match=r"frame type 2 \(WELCOME\) may not be sent by a client"
    ):
        server().feed(encode(SAMPLES[2]))
    with pytest.raises(
        ProtocolError, match=r"frame type 6 \(PUBLISH\) may not be sent by a server"
    ):
        FrameDecoder(role="client").feed(encode(Publish(message=ITEM)))


def test_nonzero_flags() -> None:
    with pytest.raises(ProtocolError, match="flags 0x01"):
        server().feed(raw_frame(19, b"\x80", flags=1))


# --- bodies ---------------------------------------------------------------------------------


def test_missing_required_field() -> None:
    with pytest.raises(
        ProtocolError, match=r"invalid PUBLISH frame: .*missing required field `message`"
    ):
        server().feed(raw_frame(6, msgspec.msgpack.encode({})))


def test_wrong_field_type() -> None:
    body = msgspec.msgpack.encode({"message": {"topic": 5, "payload": b""}})
    with pytest.raises(ProtocolError, match=r"Expected `str`, got `int` - at `\$.message.topic`"):
        server().feed(raw_frame(6, body))


@pytest.mark.parametrize(
    "body",
    [
        b"",  # length 6: no body at all
        msgspec.msgpack.encode([1, 2]),  # not a map
        msgspec.msgpack.encode({"consumer": 1}) + b"\x00",  # trailing bytes
        b"\xc1",  # never-used MessagePack byte
        b"\x81\xa8consumer\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
    ],
)
def test_malformed_body(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid UNSUBSCRIBE frame"):
        server().feed(raw_frame(18, body))


def test_invalid_utf8_in_a_string() -> None:
    body = b"\x81\xa6client\xa2\xc3\x28"  # {"client": <bad UTF-8>}
    with pytest.raises(ProtocolError, match="invalid HELLO frame: a string is not valid UTF-8"):
        server().feed(raw_frame(1, body))


def test_deeply_nested_admin_args() -> None:
    body = b"\x82\xa2op\xa1x\xa4args\x81\xa1a" + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(ProtocolError, match="invalid ADMIN frame"):
        server().feed(raw_frame(21, body))


@pytest.mark.parametrize("name", ["", "a..b", ".a", "a.", "a b", "a/b", "a\n", "é", "a" * 256])
def test_bad_topic_name(name: str) -> None:
    with pytest.raises(ProtocolError, match=r"\$.message.topic"):
        server().feed(publish_with(topic=name))


def test_bad_subscription_name() -> None:
    frame = Subscribe(subscription="no spaces", credit=1)
    with pytest.raises(ProtocolError, match=r"\$.subscription"):
        server().feed(encode(frame))


def test_numeric_bounds() -> None:
    with pytest.raises(ProtocolError, match=r"\$.credit"):
        server().feed(encode(Credit(consumer=1, credit=0)))
    with pytest.raises(ProtocolError, match=r"\$.credit"):
        server().feed(encode(Subscribe(subscription="s", credit=10_001)))
    with pytest.raises(ProtocolError, match=r"\$.consumer"):
        server().feed(encode(Unsubscribe(consumer=-1)))
    with pytest.raises(ProtocolError, match=r"\$.lease_ms"):
        server().feed(
            encode(Extend(subscription="s", message_id=MID, lease_token=LEASE, lease_ms=0))
        )


# --- limits ---------------------------------------------------------------------------------


def test_payload_over_max_payload() -> None:
    with pytest.raises(ProtocolError, match=r"\$.message.payload"):
        server().feed(publish_with(payload=b"x" * (MAX_PAYLOAD + 1)))
    assert server().feed(publish_with(payload=b"x" * MAX_PAYLOAD))


def test_payload_over_configured_limit() -> None:
    limits = Limits(max_payload=1000)
    decoder = FrameDecoder(role="server", limits=limits)
    decoder.feed(PREAMBLE)
    with pytest.raises(ProtocolError, match=r"PUBLISH frame: `message.payload` .*limit 1000"):
        decoder.feed(publish_with(payload=b"x" * 1001))


def test_batch_over_max_batch() -> None:
    item = PublishItem(topic="t", payload=b"")
    assert server().feed(encode(PublishBatch(messages=[item] * 1000)))
    with pytest.raises(ProtocolError, match=r"\$.messages"):
        server().feed(encode(PublishBatch(messages=[item] * 1001)))
    with pytest.raises(ProtocolError, match=r"\$.messages"):
        server().feed(encode(PublishBatch(messages=[])))
    decoder = FrameDecoder(role="server", limits=Limits(max_batch=2))
    decoder.feed(PREAMBLE)
    with pytest.raises(ProtocolError, match=r"PUBLISH_BATCH frame: `messages` has 3 items"):
        decoder.feed(encode(PublishBatch(messages=[item] * 3)))


def test_ack_batch_over_max_batch() -> None:
    item = SettleItem(subscription="s", message_id=MID, lease_token=LEASE)
    with pytest.raises(ProtocolError, match=r"\$.items"):
        server().feed(encode(Ack(items=[item] * 1001)))


def test_too_many_attributes() -> None:
    attrs = {f"k{i}": "v" for i in range(65)}
    with pytest.raises(ProtocolError, match=r"\$.message.attributes"):
        server().feed(publish_with(attributes=attrs))
    decoder = FrameDecoder(role="server", limits=Limits(max_attributes=3))
    decoder.feed(PREAMBLE)
    with pytest.raises(ProtocolError, match=r"`message\.attributes` has 4 entries, limit 3"):
        decoder.feed(publish_with(attributes=dict(list(attrs.items())[:4])))


def test_attribute_key_and_value_lengths() -> None:
    with pytest.raises(ProtocolError, match="key"):
        server().feed(publish_with(attributes={"k" * 129: "v"}))
    with pytest.raises(ProtocolError, match=r"\$.message.attributes"):
        server().feed(publish_with(attributes={"k": "v" * 1025}))
    decoder = FrameDecoder(role="server", limits=Limits(max_attr_value=10))
    decoder.feed(PREAMBLE)
    with pytest.raises(ProtocolError, match=r"`message.attributes\['k'\]` has length 11"):
        decoder.feed(publish_with(attributes={"k": "v" * 11}))


def test_metadata_budget() -> None:
    # 40 attributes of 1000 bytes each are individually fine but total over 32 KiB
    attrs = {f"k{i}": "v" * 1000 for i in range(40)}
    with pytest.raises(ProtocolError, match=r"total \d+ bytes, limit 32768"):
        server().feed(publish_with(attributes=attrs))
    # counted in UTF-8 bytes, not characters: 20 x 1000 four-byte characters = 80 000 bytes
    wide = {f"k{i}": "\U0001f4b3" * 1000 for i in range(20)}
    with pytest.raises(ProtocolError, match=r"total \d+ bytes"):
        server().feed(publish_with(attributes=wide))


def test_oversized_token() -> None:
    with pytest.raises(ProtocolError, match=r"\$.token"):
        server().feed(encode(Hello(client="c", token="t" * 8193)))
    with pytest.raises(ProtocolError, match=r"\$.token"):
        server().feed(encode(Auth(token="t" * 8193)))
    decoder = FrameDecoder(role="server", limits=Limits(max_token=100))
    decoder.feed(PREAMBLE)
    with pytest.raises(ProtocolError, match="AUTH frame: `token` has length 101, limit 100"):
        decoder.feed(encode(Auth(token="t" * 101)))


def test_oversized_keys_and_text() -> None:
    with pytest.raises(ProtocolError, match=r"\$.message.idempotency_key"):
        server().feed(publish_with(idempotency_key="k" * 256))
    with pytest.raises(ProtocolError, match=r"\$.message.idempotency_key"):
        server().feed(publish_with(idempotency_key=""))
    with pytest.raises(ProtocolError, match=r"\$.reason"):
        server().feed(encode(Close(code=1, reason="r" * 1025)))


def test_largest_deliver_fits_in_max_frame() -> None:
    """Any message a server accepts can be delivered to a client with default limits."""
    four = "\U0001f4b3"  # 4 bytes in UTF-8
    attrs = {four * 8 + f"{i:04d}": four * 93 for i in range(64)}
    trace = {four * 8 + f"{i:04d}": four * 93 for i in range(16)}
    frame = Deliver(
        consumer=0xFFFF_FFFF,
        subscription="s" * 255,
        topic="t" * 255,
        message_id=four * 64,
        lease_token=four * 64,
        lease_expires_ms=253_402_300_799_999,
        attempt=0xFFFF_FFFF,
        payload=b"p" * MAX_PAYLOAD,
        attributes=attrs,
        content_type=four * 255,
        idempotency_key=four * 255,
        ordering_key=four * 255,
        published_ms=253_402_300_799_999,
        trace_context=trace,
    )
    entries = [*attrs.items(), *trace.items()]
    assert sum(len(k.encode()) + len(v.encode()) for k, v in entries) <= MAX_METADATA
    wire = encode(frame)
    assert len(wire) - 4 <= MAX_FRAME
    assert FrameDecoder(role="client").feed(wire) == [Envelope(0, frame)]


def test_limits_configuration() -> None:
    assert Limits() == Limits(max_frame=MAX_FRAME)
    Limits(max_frame=4 * MAX_FRAME, max_batch=10)
    with pytest.raises(ConfigError, match="max_payload"):
        Limits(max_payload=MAX_PAYLOAD + 1)
    with pytest.raises(ConfigError, match="max_batch"):
        Limits(max_batch=0)
    with pytest.raises(ConfigError, match="max_frame"):
        Limits(max_frame=100_000)
    with pytest.raises(ConfigError, match="max_frame"):
        Limits(max_frame=2**24 + 1)


def test_validate_directly() -> None:
    validate(Publish(message=ITEM), Limits())
    with pytest.raises(ProtocolError, match="idempotency_key"):
        validate(Publish(message=ITEM), Limits(max_key=5))
    for frame in SAMPLES:
        validate(frame, Limits())


# --- errors are final -----------------------------------------------------------------------


def test_decoder_is_poisoned_after_an_error() -> None:
    decoder = server()
    with pytest.raises(ProtocolError) as first:
        decoder.feed(raw_frame(99, b"\x80"))
    assert decoder.buffered == 0
    for _ in range(2):
        with pytest.raises(ProtocolError) as again:
            decoder.feed(encode(Ping()))
        assert again.value is first.value
    assert decoder.buffered == 0


def test_frames_before_an_error_in_the_same_feed_are_discarded() -> None:
    decoder = server()
    with pytest.raises(ProtocolError, match="unknown frame type 99"):
        decoder.feed(encode(Ping(), 1) + raw_frame(99, b"\x80"))


def test_protocol_error_carries_wire_codes() -> None:
    with pytest.raises(FrameTooLarge) as info:
        server().feed(b"\xff\xff\xff\xff")
    assert (info.value.code, info.value.wire) == ("frame_too_large", 41)
    with pytest.raises(UnsupportedVersion) as version:
        FrameDecoder(role="server").feed(b"SBRK\x00\x02\r\n")
    assert (version.value.code, version.value.wire) == ("unsupported_version", 42)


def test_envelope_is_frozen() -> None:
    env = Envelope(1, Ping())
    with pytest.raises(AttributeError):
        env.request_id = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Ping().x = 1  # type: ignore[attr-defined]
