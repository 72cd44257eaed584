"""Sans-I/O codec of the native protocol: bytes in, frames out; frames in, bytes out.

No sockets and no event loop here. The connection layer feeds whatever bytes arrived to
:meth:`FrameDecoder.feed` and writes whatever :func:`encode` returns; the wire format is specified
in ``docs/protocol.md``.

Memory is bounded before it is spent: a frame's length field is checked as soon as its four
bytes are there, so the decoder holds at most one incomplete frame (``buffered`` never exceeds
``limits.max_frame + 9``). Complete frames are decoded straight out of the caller's chunk without
copying; only the trailing partial frame is kept.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec

from securebroker.errors import FrameTooLarge, ProtocolError, UnsupportedVersion
from securebroker.protocol.frames import (
    FRAME_TYPES,
    PROTOCOL_VERSION,
    Frame,
    Limits,
    frame_name,
    validate,
)

__all__ = [
    "DEFAULT_LIMITS",
    "HEADER_SIZE",
    "MAGIC",
    "MIN_FRAME",
    "PREAMBLE",
    "Envelope",
    "FrameDecoder",
    "encode",
    "encode_many",
]

DEFAULT_LIMITS = Limits()

MAGIC = b"SBRK"
#: What a client sends first: magic, major version (u16 big-endian), CR LF.
PREAMBLE = MAGIC + PROTOCOL_VERSION.to_bytes(2, "big") + b"\r\n"
_PREAMBLE_SIZE = len(PREAMBLE)

#: u32 length, u8 type, u8 flags, u32 request id.
_HEADER = struct.Struct(">IBBI")
_LENGTH = struct.Struct(">I")
HEADER_SIZE = _HEADER.size  # 10
#: Smallest legal value of the length field: type, flags and request id, empty body.
MIN_FRAME = HEADER_SIZE - _LENGTH.size  # 6
_MAX_REQUEST_ID = 0xFFFF_FFFF

_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[int, msgspec.msgpack.Decoder[Frame]] = {
    number: msgspec.msgpack.Decoder(cls) for number, cls in FRAME_TYPES.items()
}
_ACCEPTS: dict[str, frozenset[str]] = {
    "server": frozenset({"client", "both"}),
    "client": frozenset({"server", "both"}),
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded frame and the request id it carried (0 when not a request or reply)."""

    request_id: int
    frame: Frame


def _bad_request_id(request_id: int) -> ValueError:
    return ValueError(f"request_id must be in 0..{_MAX_REQUEST_ID}, got {request_id!r}")


def encode(frame: Frame, request_id: int = 0) -> bytes:
    """Encode one frame, header included."""
    buf = bytearray(HEADER_SIZE)
    _ENCODER.encode_into(frame, buf, HEADER_SIZE)
    try:
        _HEADER.pack_into(buf, 0, len(buf) - _LENGTH.size, frame.TYPE, 0, request_id)
    except struct.error:
        raise _bad_request_id(request_id) from None
    return bytes(buf)


def encode_many(items: Iterable[tuple[Frame, int]]) -> bytes:
    """Encode ``(frame, request_id)`` pairs back to back into one buffer (one write)."""
    buf = bytearray()
    start = 0
    for frame, request_id in items:
        _ENCODER.encode_into(frame, buf, start + HEADER_SIZE)
        end = len(buf)
        try:
            _HEADER.pack_into(buf, start, end - start - _LENGTH.size, frame.TYPE, 0, request_id)
        except struct.error:
            raise _bad_request_id(request_id) from None
        start = end
    return bytes(buf)


class FrameDecoder:
    """Incremental decoder for one direction of one connection.

    ``role="server"`` decodes what a client sends: it expects the preamble first and accepts only
    frames a client may send; ``role="client"`` decodes what a server sends (no preamble).

    :meth:`feed` returns every frame completed by the bytes given, in order. On malformed input
    it raises a :class:`ProtocolError` (or subclass) and the decoder is poisoned: every later call
    raises the same error. Frames that preceded the bad one in the same call are discarded with
    it; the connection is closing, so none of them has been answered.
    """

    __slots__ = ("_buf", "_decoders", "_error", "_limits", "_need", "_preamble", "_role")

    def __init__(
        self, *, role: Literal["server", "client"], limits: Limits = DEFAULT_LIMITS
    ) -> None:
        if role not in _ACCEPTS:
            raise ValueError(f"role must be 'server' or 'client', got {role!r}")
        self._role = role
        self._limits = limits
        senders = _ACCEPTS[role]
        self._decoders = {n: d for n, d in _DECODERS.items() if FRAME_TYPES[n].SENDER in senders}
        self._buf = bytearray()
        # Total size (length field included) of the partial frame in _buf; 0 while unknown.
        self._need = 0
        self._preamble = role == "server"
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame (or preamble) not complete yet."""
        return len(self._buf)

    @property
    def limits(self) -> Limits:
        return self._limits

    def feed(self, data: bytes | bytearray | memoryview) -> list[Envelope]:
        """Take the next bytes from the peer; return the frames they complete."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        try:
            with memoryview(data) as view:
                if view.format != "B" or view.ndim != 1:
                    with view.cast("B") as flat:
                        return self._feed(flat)
                return self._feed(view)
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            self._need = 0
            raise

    # -- internals ---------------------------------------------------------------------------

    def _feed(self, view: memoryview) -> list[Envelope]:
        out: list[Envelope] = []
        end = len(view)
        pos = 0
        if self._preamble:
            pos = self._take_preamble(view)
            if self._preamble:
                return out
        if self._buf:
            pos = self._fill_partial(view, pos, out)
            if self._buf:
                return out
        max_frame = self._limits.max_frame
        unpack_length = _LENGTH.unpack_from
        while end - pos >= 4:
            (length,) = unpack_length(view, pos)
            if length > max_frame or length < MIN_FRAME:
                self._bad_length(length)
            stop = pos + 4 + length
            if stop > end:
                self._need = 4 + length
                break
            out.append(self._decode(view, pos, stop))
            pos = stop
        if pos < end:
            self._buf += view[pos:]
        return out

    def _take_preamble(self, view: memoryview) -> int:
        buf = self._buf
        take = min(_PREAMBLE_SIZE - len(buf), len(view))
        buf += view[:take]
        got = bytes(buf)
        magic = min(len(got), len(MAGIC))
        if got[:magic] != MAGIC[:magic]:
            raise ProtocolError("bad preamble: not a securebroker client")
        if len(got) >= 6:
            version = int.from_bytes(got[4:6], "big")
            if version != PROTOCOL_VERSION:
                raise UnsupportedVersion(
                    f"unsupported protocol version {version}; "
                    f"this server speaks version {PROTOCOL_VERSION}"
                )
        if len(got) == _PREAMBLE_SIZE:
            if got != PREAMBLE:
                raise ProtocolError("bad preamble: not a securebroker client")
            self._buf = bytearray()
            self._preamble = False
        return take

    def _fill_partial(self, view: memoryview, pos: int, out: list[Envelope]) -> int:
        """Complete the partial frame in the buffer from ``view[pos:]``; return the new position."""
        buf = self._buf
        end = len(view)
        if not self._need:
            take = min(4 - len(buf), end - pos)
            buf += view[pos : pos + take]
            pos += take
            if len(buf) < 4:
                return pos
            (length,) = _LENGTH.unpack_from(buf, 0)
            if length > self._limits.max_frame or length < MIN_FRAME:
                self._bad_length(length)
            self._need = 4 + length
        take = min(self._need - len(buf), end - pos)
        buf += view[pos : pos + take]
        pos += take
        if len(buf) == self._need:
            self._buf = bytearray()
            self._need = 0
            with memoryview(buf) as whole:
                out.append(self._decode(whole, 0, len(whole)))
        return pos

    def _bad_length(self, length: int) -> None:
        if length < MIN_FRAME:
            raise ProtocolError(f"frame length {length} is below the minimum {MIN_FRAME}")
        raise FrameTooLarge(
            f"frame length {length} exceeds the limit of {self._limits.max_frame} bytes"
        )

    def _decode(self, view: memoryview, start: int, stop: int) -> Envelope:
        _, frame_type, flags, request_id = _HEADER.unpack_from(view, start)
        decoder = self._decoders.get(frame_type)
        if decoder is None:
            if frame_type in FRAME_TYPES:
                raise ProtocolError(
                    f"frame type {frame_type} ({frame_name(frame_type)}) "
                    f"may not be sent by a {'client' if self._role == 'server' else 'server'}"
                )
            raise ProtocolError(f"unknown frame type {frame_type}")
        if flags:
            raise ProtocolError(
                f"{frame_name(frame_type)} frame has flags 0x{flags:02x}; "
                "they must be 0 in version 1"
            )
        try:
            frame = decoder.decode(view[start + HEADER_SIZE : stop])
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"invalid {frame_name(frame_type)} frame: {exc}") from None
        except UnicodeDecodeError:
            raise ProtocolError(
                f"invalid {frame_name(frame_type)} frame: a string is not valid UTF-8"
            ) from None
        except RecursionError:
            raise ProtocolError(
                f"invalid {frame_name(frame_type)} frame: nested too deeply"
            ) from None
        validate(frame, self._limits)
        return Envelope(request_id, frame)
