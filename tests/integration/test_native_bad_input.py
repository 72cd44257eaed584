"""Bad input over real TLS connections to the real NativeServer, spoken as raw bytes.

Every bad case checks: the bad peer gets a clear ERROR frame (with the catalogue code) and a
closed connection (or just the close, where it hung up itself); nothing it sent was published;
and a well-behaved SDK client connected at the same time keeps publishing and consuming.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from native_fixtures import (
    ADMIN,
    IO_TIMEOUT,
    NativeFactory,
    NativeHarness,
    close_writer,
    make_queue,
    read_frames,
    read_to_eof,
)

from securebroker.client import Client, Subscription
from securebroker.errors import FrameTooLarge, ProtocolError, UnsupportedVersion
from securebroker.protocol import (
    FRAME_TYPES,
    MAGIC,
    PREAMBLE,
    FrameDecoder,
    Hello,
    Limits,
    Ping,
    Publish,
    PublishItem,
    encode,
)
from securebroker.protocol import frames as f

GOOD_TOPIC, GOOD_SUB = "good.orders", "good.orders.worker"
BAD_TOPIC, BAD_SUB = "bad.orders", "bad.orders.sink"
HELLO = encode(Hello(client="raw-test"), 1)
PROTOCOL_CODES = {ProtocolError.wire, FrameTooLarge.wire, UnsupportedVersion.wire, 43}


def publish_frame(key: str, rid: int = 2, topic: str = BAD_TOPIC) -> bytes:
    item = PublishItem(topic=topic, payload=b"bad client payload", idempotency_key=key)
    return encode(Publish(message=item), rid)


def header(length: int, frame_type: int, flags: int = 0, rid: int = 7) -> bytes:
    return struct.pack(">IBBI", length, frame_type, flags, rid)


@dataclass
class GoodClient:
    """A well-behaved SDK client on its own connection, checked around every bad case."""

    h: NativeHarness
    client: Client
    sub: Subscription
    sent: int = 0

    async def exercise(self, n: int = 3) -> None:
        for _ in range(n):
            self.sent += 1
            res = await self.client.publish(
                GOOD_TOPIC, b"good %d" % self.sent, idempotency_key=f"good-{self.sent}"
            )
            async with asyncio.timeout(IO_TIMEOUT):
                m = await anext(self.sub)
            assert (m.id, m.payload) == (res.message_id, b"good %d" % self.sent)
            await m.ack()

    async def check_nothing_else_published(self) -> None:
        counts = await self.h.counts(BAD_SUB)
        assert (counts.ready, counts.leased, counts.delayed, counts.dead) == (0, 0, 0, 0)
        assert await self.h.message_count() == 0  # the good ones were acked, hence deleted


async def _good_client(h: NativeHarness) -> GoodClient:
    await make_queue(h, GOOD_TOPIC, GOOD_SUB)
    await make_queue(h, BAD_TOPIC, BAD_SUB)
    client = await h.connect(ADMIN)
    good = GoodClient(h, client, client.consume(GOOD_SUB, credit=10))
    await good.exercise(1)
    return good


@pytest.fixture
async def good(native: NativeHarness) -> GoodClient:
    return await _good_client(native)


async def send_and_expect_error(
    h: NativeHarness, payload: bytes, *, after_hello: bool
) -> tuple[f.Error, list[f.Frame]]:
    """Send ``payload`` (after PREAMBLE + HELLO if asked); return the ERROR and what preceded it."""
    if after_hello:
        reader, writer, decoder, _welcome = await h.raw_hello()
    else:
        reader, writer = await h.open_raw()
        decoder = FrameDecoder(role="client")
    try:
        writer.write(payload)
        frames, exc = await read_to_eof(reader, decoder)
    finally:
        await close_writer(writer)
    assert exc is None, f"connection reset instead of a clean close: {exc!r}"
    assert frames, "no ERROR frame before the close"
    error = frames[-1]
    assert isinstance(error, f.Error), frames
    assert error.code in PROTOCOL_CODES and not error.retryable
    return error, frames[:-1]


async def run_with_good_client(good: GoodClient, bad: Coroutine[Any, Any, None]) -> None:
    async with asyncio.timeout(IO_TIMEOUT * 2):
        await asyncio.gather(bad, good.exercise(3))
    await good.exercise(1)
    await good.check_nothing_else_published()


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 3, 4, 10, -1], ids=lambda c: f"cut{c}")
async def test_truncated_frame_then_eof(native: NativeHarness, good: GoodClient, cut: int) -> None:
    async def bad() -> None:
        _reader, writer, _decoder, welcome = await native.raw_hello()
        conn = native.connection(welcome.session)
        frame = publish_frame("truncated")
        writer.write(frame[:cut])
        await writer.drain()
        await close_writer(writer)  # EOF in the middle of the frame
        async with asyncio.timeout(IO_TIMEOUT):
            await conn.closed.wait()
        assert conn.decoder.buffered <= len(frame)
        assert conn not in native.server.connections

    await run_with_good_client(good, bad())


@pytest.mark.parametrize("after_hello", [True, False], ids=["after-hello", "before-hello"])
@pytest.mark.parametrize(
    "length",
    [0xFFFF_FFFF, Limits().max_frame + 1, 0xDEAD_BEEF],
    ids=["max-u32", "limit+1", "deadbeef"],
)
async def test_oversized_length_field(
    native: NativeHarness, good: GoodClient, length: int, after_hello: bool
) -> None:
    async def bad() -> None:
        # Only the header: the server must refuse on the length alone, not wait for the body.
        payload = header(length, Publish.TYPE)
        if not after_hello:
            payload = PREAMBLE + payload
        error, before = await send_and_expect_error(native, payload, after_hello=after_hello)
        assert error.code == FrameTooLarge.wire and error.name == FrameTooLarge.code
        assert f"frame length {length} exceeds the limit" in error.message
        assert before == []

    await run_with_good_client(good, bad())
    assert await native.wait_refusal(f"protocol error: frame length {length}")


@pytest.mark.parametrize("frame_type", [0, 99, 250, 255])
async def test_unknown_frame_type(native: NativeHarness, good: GoodClient, frame_type: int) -> None:
    assert frame_type not in FRAME_TYPES

    async def bad() -> None:
        body = b"\x80"  # an empty msgpack map
        payload = header(6 + len(body), frame_type) + body + publish_frame("after-unknown", 3)
        error, _ = await send_and_expect_error(native, payload, after_hello=True)
        assert error.code == ProtocolError.wire
        assert f"unknown frame type {frame_type}" in error.message

    await run_with_good_client(good, bad())


@pytest.mark.parametrize(
    ("garbage", "expected"),
    [
        (b"\x00\x00\x00\x01!", "below the minimum"),
        (b"\x00\x00\x00\x00", "below the minimum"),
        (header(6 + 9, Publish.TYPE) + b"not-msgpk", "invalid PUBLISH frame"),
        (header(6 + 1, Publish.TYPE) + b"\x80", "invalid PUBLISH frame"),  # no fields at all
        (header(6 + 1, Ping.TYPE, flags=0x80) + b"\x80", "flags"),
        (header(6 + 1, f.Welcome.TYPE) + b"\x80", "may not be sent by a client"),
    ],
    ids=["tiny-length", "zero-length", "bad-msgpack", "empty-publish", "flags", "server-type"],
)
@pytest.mark.parametrize("after_hello", [True, False], ids=["after-hello", "before-hello"])
async def test_garbage_after_preamble(
    native: NativeHarness, good: GoodClient, garbage: bytes, expected: str, after_hello: bool
) -> None:
    async def bad() -> None:
        payload = garbage + publish_frame("after-garbage", 9)
        if not after_hello:
            payload = PREAMBLE + payload
        error, _ = await send_and_expect_error(native, payload, after_hello=after_hello)
        assert error.code == ProtocolError.wire
        assert expected in error.message

    await run_with_good_client(good, bad())


@pytest.mark.parametrize(
    ("preamble", "code", "expected"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", ProtocolError.wire, "bad preamble"),
        (b"SBRQ\x00\x01\r\n", ProtocolError.wire, "bad preamble"),
        (MAGIC + b"\x00\x02\r\n", UnsupportedVersion.wire, "unsupported protocol version 2"),
        (MAGIC + b"\x00\x01\n\r", ProtocolError.wire, "bad preamble"),
        (HELLO, ProtocolError.wire, "bad preamble"),  # no preamble at all
    ],
    ids=["http", "magic", "version", "crlf", "missing"],
)
async def test_bad_preamble(
    native: NativeHarness, good: GoodClient, preamble: bytes, code: int, expected: str
) -> None:
    async def bad() -> None:
        error, before = await send_and_expect_error(
            native, preamble + HELLO + publish_frame("bad-preamble"), after_hello=False
        )
        assert error.code == code and expected in error.message
        assert before == []

    await run_with_good_client(good, bad())


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (publish_frame("before-hello"), "expected HELLO first, got PUBLISH"),
        (encode(Ping(), 1), "expected HELLO first, got PING"),
        (encode(f.Subscribe(subscription=BAD_SUB, credit=5), 1), "got SUBSCRIBE"),
        (encode(f.Admin(op="topic.delete", args={"name": BAD_TOPIC}), 1), "got ADMIN"),
    ],
    ids=["publish", "ping", "subscribe", "admin"],
)
async def test_frames_before_hello_are_rejected(
    native: NativeHarness, good: GoodClient, first: bytes, expected: str
) -> None:
    async def bad() -> None:
        error, before = await send_and_expect_error(
            native, PREAMBLE + first + HELLO + publish_frame("then-hello", 3), after_hello=False
        )
        assert error.code == ProtocolError.wire and expected in error.message
        assert before == []

    await run_with_good_client(good, bad())
    await native.broker.get_topic(BAD_TOPIC)  # the ADMIN before HELLO deleted nothing


async def test_hello_twice_is_rejected(native: NativeHarness, good: GoodClient) -> None:
    async def bad() -> None:
        error, _ = await send_and_expect_error(
            native, HELLO + publish_frame("after-second-hello", 3), after_hello=True
        )
        assert error.code == ProtocolError.wire and "HELLO sent twice" in error.message

    await run_with_good_client(good, bad())


# --------------------------------------------------------------------------------------------
# a valid sequence, split


def valid_sequence(key: str) -> bytes:
    item = PublishItem(topic=GOOD_TOPIC, payload=b"split " + key.encode(), idempotency_key=key)
    return PREAMBLE + HELLO + encode(Publish(message=item), 2)


async def _expect_welcome_and_confirm(
    reader: asyncio.StreamReader, decoder: FrameDecoder, have: list[tuple[int, f.Frame]]
) -> None:
    frames = have + await read_frames(
        reader, decoder, until=lambda fr: isinstance(fr, f.Confirm | f.Error)
    )
    kinds = [(rid, type(fr)) for rid, fr in frames]
    assert kinds == [(1, f.Welcome), (2, f.Confirm)], frames


async def test_valid_sequence_one_byte_at_a_time(native: NativeHarness, good: GoodClient) -> None:
    data = valid_sequence("bytewise")
    reader, writer = await native.open_raw()
    decoder = FrameDecoder(role="client")
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])  # one TLS record per byte
            await writer.drain()
        await _expect_welcome_and_confirm(reader, decoder, [])
    finally:
        await close_writer(writer)
    async with asyncio.timeout(IO_TIMEOUT):
        m = await anext(good.sub)
    assert m.payload == b"split bytewise"
    await m.ack()
    await good.exercise(1)


async def test_valid_sequence_split_at_sample_boundaries(
    native: NativeHarness, good: GoodClient
) -> None:
    hello_end = len(PREAMBLE) + len(HELLO)
    total = len(valid_sequence("cut-000"))
    cuts = sorted(
        {1, 3, 4, 5, 7, len(PREAMBLE), len(PREAMBLE) + 2, len(PREAMBLE) + 4, len(PREAMBLE) + 10}
        | {hello_end - 1, hello_end, hello_end + 1, hello_end + 4, hello_end + 10, total - 1}
    )
    for cut in cuts:
        data = valid_sequence(f"cut-{cut:03d}")
        assert len(data) == total
        reader, writer = await native.open_raw()
        decoder = FrameDecoder(role="client")
        try:
            writer.write(data[:cut])
            await writer.drain()
            got: list[tuple[int, f.Frame]] = []
            if cut >= hello_end:
                # The server answered the HELLO, so it has read up to the cut: the rest of the
                # PUBLISH arrives separately.
                got = await read_frames(reader, decoder, count=1)
            writer.write(data[cut:])
            await _expect_welcome_and_confirm(reader, decoder, got)
        finally:
            await close_writer(writer)
        async with asyncio.timeout(IO_TIMEOUT):
            m = await anext(good.sub)
        assert m.payload == f"split cut-{cut:03d}".encode()
        await m.ack()
    await good.exercise(1)
    assert native.refusals == []


# --------------------------------------------------------------------------------------------
# random bytes (hypothesis)

#: Small protocol limits, so padding can always complete a pending partial frame.
SMALL = Limits(max_payload=1024, max_metadata=1024, max_frame=1024 + 1024 + 16_384)
#: Enough bytes of 0xFF to complete any partial frame and then form a length of 0xFFFFFFFF.
PADDING = b"\xff" * (SMALL.max_frame + 12)


@pytest.fixture
async def small_native(native_factory: NativeFactory) -> tuple[NativeHarness, GoodClient]:
    h = await native_factory(limits=SMALL)
    return h, await _good_client(h)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(garbage=st.binary(min_size=1, max_size=300), after_hello=st.booleans())
async def test_random_bytes_get_an_error_or_a_close(
    small_native: tuple[NativeHarness, GoodClient], garbage: bytes, after_hello: bool
) -> None:
    h, good = small_native
    if after_hello:
        reader, writer, decoder, _welcome = await h.raw_hello()
    else:
        reader, writer = await h.open_raw()
        decoder = FrameDecoder(role="client")
        writer.write(PREAMBLE)
    try:
        writer.write(garbage)
        writer.write(PADDING)  # whatever state the garbage left, this ends in an error
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.drain()
        frames, _exc = await read_to_eof(reader, decoder)
    finally:
        await close_writer(writer)
    # An ERROR frame then the close (a reset also counts as closed); only PONGs before it.
    if frames:
        *before, last = frames
        assert isinstance(last, f.Error) and last.code in PROTOCOL_CODES, frames
        assert all(isinstance(fr, f.Pong) for fr in before), frames
    # The server stays healthy and the bad peer published nothing.
    await good.exercise(1)
    await good.check_nothing_else_published()
    for conn in h.server.connections:
        assert conn.decoder.buffered <= SMALL.max_frame + 9
