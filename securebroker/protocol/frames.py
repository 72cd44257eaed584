"""Frame bodies of the native protocol, version 1, and the limits every field obeys.

Each frame type is a frozen msgspec ``Struct`` encoded as a MessagePack map (see
``docs/protocol.md``). Field bounds are enforced twice, on purpose:

* statically, by msgspec ``Meta`` constraints at the *protocol maxima* of version 1, so nothing
  the decoder builds from network input is ever larger than those, whatever the configuration;
* dynamically, by :func:`validate` against a :class:`Limits`, which may only *lower* the maxima
  (a deployment that wants smaller frames or batches).

Structs ignore unknown fields (``forbid_unknown_fields=False``) so that a later minor revision
can add optional fields without breaking older peers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from securebroker.errors import ConfigError, ProtocolError

__all__ = [
    "FRAME_TYPES",
    "MAX_ATTRIBUTES",
    "MAX_ATTR_KEY",
    "MAX_ATTR_VALUE",
    "MAX_BATCH",
    "MAX_CREDIT",
    "MAX_ERROR_TEXT",
    "MAX_FRAME",
    "MAX_FRAME_CEILING",
    "MAX_KEY",
    "MAX_METADATA",
    "MAX_NAME",
    "MAX_PAYLOAD",
    "MAX_TOKEN",
    "MAX_TRACE_ENTRIES",
    "NAME_PATTERN",
    "PROTOCOL_VERSION",
    "Ack",
    "Admin",
    "AdminResult",
    "Auth",
    "Close",
    "Confirm",
    "Confirmed",
    "Credit",
    "Deliver",
    "Error",
    "Extend",
    "Extended",
    "Frame",
    "Hello",
    "Limits",
    "Nack",
    "NackItem",
    "Ok",
    "Ping",
    "Pong",
    "Publish",
    "PublishBatch",
    "PublishItem",
    "Settle",
    "SettleConfirm",
    "SettleItem",
    "SettleResult",
    "Settled",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
    "Welcome",
    "frame_name",
    "validate",
]

PROTOCOL_VERSION = 1

# --- protocol maxima of version 1 (also the default limits) ---------------------------------

MAX_FRAME = 1_114_112  # 1 MiB payload + 64 KiB for everything else
MAX_PAYLOAD = 1_048_576
MAX_BATCH = 1000
MAX_ATTRIBUTES = 64
MAX_ATTR_KEY = 128
MAX_ATTR_VALUE = 1024
MAX_NAME = 255
MAX_KEY = 255
MAX_TOKEN = 8192
MAX_ERROR_TEXT = 1024
MAX_CREDIT = 10_000
#: UTF-8 bytes of all attribute and trace-context keys and values of one message. Together with
#: the other bounded fields this keeps every DELIVER of an accepted message inside ``MAX_FRAME``.
MAX_METADATA = 32_768
MAX_TRACE_ENTRIES = 16
#: The largest ``max_frame`` a deployment may configure (room for larger batches).
MAX_FRAME_CEILING = 16_777_216
#: Bytes a frame needs beyond payload and metadata (header, names, keys, ids, map overhead).
FRAME_OVERHEAD = 16_384

_U32 = 0xFFFF_FFFF
_MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_MAX_DURATION_MS = 2**31 - 1  # about 24.8 days

#: Topic and subscription names: dot-separated segments of ``[A-Za-z0-9_-]``.
NAME_PATTERN = r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z"

# --- constrained field types ---------------------------------------------------------------

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN)]
Key = Annotated[str, Meta(min_length=1, max_length=MAX_KEY)]
Token = Annotated[str, Meta(min_length=1, max_length=MAX_TOKEN)]
Payload = Annotated[bytes, Meta(max_length=MAX_PAYLOAD)]
AttrKey = Annotated[str, Meta(min_length=1, max_length=MAX_ATTR_KEY)]
AttrValue = Annotated[str, Meta(max_length=MAX_ATTR_VALUE)]
Attributes = Annotated[dict[AttrKey, AttrValue], Meta(max_length=MAX_ATTRIBUTES)]
TraceContext = Annotated[dict[AttrKey, AttrValue], Meta(max_length=MAX_TRACE_ENTRIES)]
ContentType = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
Id = Annotated[str, Meta(min_length=1, max_length=64)]  # message ids, lease tokens (UUID text)
Label = Annotated[str, Meta(max_length=MAX_NAME)]  # client/server software names, sessions
Principal = Annotated[str, Meta(max_length=1024)]
ErrorName = Annotated[str, Meta(max_length=64)]
Text = Annotated[str, Meta(max_length=MAX_ERROR_TEXT)]
U16 = Annotated[int, Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, Meta(ge=0, le=_U32)]
EpochMs = Annotated[int, Meta(ge=0, le=_MAX_EPOCH_MS)]
DurationMs = Annotated[int, Meta(ge=0, le=_MAX_DURATION_MS)]
LeaseMs = Annotated[int, Meta(ge=1, le=_MAX_DURATION_MS)]
CreditCount = Annotated[int, Meta(ge=0, le=MAX_CREDIT)]
Attempt = Annotated[int, Meta(ge=1, le=_U32)]
AdminOp = Annotated[str, Meta(min_length=1, max_length=64, pattern=NAME_PATTERN)]
AdminArgs = Annotated[dict[Annotated[str, Meta(max_length=MAX_NAME)], Any], Meta(max_length=64)]

Sender = Literal["client", "server", "both"]


class _Struct(
    msgspec.Struct,
    kw_only=True,
    omit_defaults=True,
    frozen=True,
    forbid_unknown_fields=False,
):
    """Common configuration of every body and item struct (inherited by subclasses)."""


class _Frame(_Struct, kw_only=True, frozen=True):
    #: Frame type number on the wire.
    TYPE: ClassVar[int]
    #: Upper-case name used in specs and error messages.
    NAME: ClassVar[str]
    #: Which side may send it.
    SENDER: ClassVar[Sender]


# --- item structs ---------------------------------------------------------------------------


class PublishItem(_Struct, kw_only=True, frozen=True):
    topic: Name
    payload: Payload
    attributes: Attributes = {}
    content_type: ContentType = "application/octet-stream"
    idempotency_key: Key | None = None
    ordering_key: Key | None = None
    not_before_ms: EpochMs | None = None
    expires_at_ms: EpochMs | None = None
    trace_context: TraceContext = {}


class Confirmed(_Struct, kw_only=True, frozen=True):
    message_id: Id
    duplicate: bool = False


class SettleItem(_Struct, kw_only=True, frozen=True):
    subscription: Name
    message_id: Id
    lease_token: Id


class NackItem(_Struct, kw_only=True, frozen=True):
    subscription: Name
    message_id: Id
    lease_token: Id
    error: Text = ""
    delay_ms: DurationMs | None = None


class SettleResult(_Struct, kw_only=True, frozen=True):
    ok: bool
    code: U16 = 0
    name: ErrorName = ""
    message: Text = ""


# --- frames ---------------------------------------------------------------------------------


class Hello(_Frame, kw_only=True, frozen=True):
    TYPE = 1
    NAME = "HELLO"
    SENDER = "client"
    client: Label
    token: Token | None = None


class Welcome(_Frame, kw_only=True, frozen=True):
    TYPE = 2
    NAME = "WELCOME"
    SENDER = "server"
    version: U16
    server: Label
    session: Label
    max_frame: U32
    max_batch: U32
    heartbeat_ms: DurationMs
    principal: Principal


class Auth(_Frame, kw_only=True, frozen=True):
    TYPE = 3
    NAME = "AUTH"
    SENDER = "client"
    token: Token


class Ok(_Frame, kw_only=True, frozen=True):
    TYPE = 4
    NAME = "OK"
    SENDER = "server"


class Error(_Frame, kw_only=True, frozen=True):
    TYPE = 5
    NAME = "ERROR"
    SENDER = "server"
    code: U16
    name: ErrorName
    message: Text
    retryable: bool


class Publish(_Frame, kw_only=True, frozen=True):
    TYPE = 6
    NAME = "PUBLISH"
    SENDER = "client"
    message: PublishItem


class PublishBatch(_Frame, kw_only=True, frozen=True):
    TYPE = 7
    NAME = "PUBLISH_BATCH"
    SENDER = "client"
    messages: Annotated[list[PublishItem], Meta(min_length=1, max_length=MAX_BATCH)]


class Confirm(_Frame, kw_only=True, frozen=True):
    TYPE = 8
    NAME = "CONFIRM"
    SENDER = "server"
    results: Annotated[list[Confirmed], Meta(max_length=MAX_BATCH)]


class Subscribe(_Frame, kw_only=True, frozen=True):
    TYPE = 9
    NAME = "SUBSCRIBE"
    SENDER = "client"
    subscription: Name
    credit: CreditCount
    lease_ms: LeaseMs | None = None


class Subscribed(_Frame, kw_only=True, frozen=True):
    TYPE = 10
    NAME = "SUBSCRIBED"
    SENDER = "server"
    consumer: U32


class Credit(_Frame, kw_only=True, frozen=True):
    TYPE = 11
    NAME = "CREDIT"
    SENDER = "client"
    consumer: U32
    credit: Annotated[int, Meta(ge=1, le=MAX_CREDIT)]


class Deliver(_Frame, kw_only=True, frozen=True):
    TYPE = 12
    NAME = "DELIVER"
    SENDER = "server"
    consumer: U32
    subscription: Name
    topic: Name
    message_id: Id
    lease_token: Id
    lease_expires_ms: EpochMs
    attempt: Attempt
    payload: Payload
    attributes: Attributes = {}
    content_type: ContentType = "application/octet-stream"
    idempotency_key: Key | None = None
    ordering_key: Key | None = None
    published_ms: EpochMs
    trace_context: TraceContext = {}
    #: instead of a payload: "payload_destroyed" (its keys were destroyed) or
    #: "payload_unreadable" (it failed authentication); ``payload`` is then empty
    payload_error: Annotated[str, Meta(min_length=1, max_length=64)] | None = None


class Ack(_Frame, kw_only=True, frozen=True):
    TYPE = 13
    NAME = "ACK"
    SENDER = "client"
    items: Annotated[list[SettleItem], Meta(min_length=1, max_length=MAX_BATCH)]


class Nack(_Frame, kw_only=True, frozen=True):
    TYPE = 14
    NAME = "NACK"
    SENDER = "client"
    items: Annotated[list[NackItem], Meta(min_length=1, max_length=MAX_BATCH)]


class Settled(_Frame, kw_only=True, frozen=True):
    TYPE = 15
    NAME = "SETTLED"
    SENDER = "server"
    results: Annotated[list[SettleResult], Meta(max_length=MAX_BATCH)]


class Extend(_Frame, kw_only=True, frozen=True):
    TYPE = 16
    NAME = "EXTEND"
    SENDER = "client"
    subscription: Name
    message_id: Id
    lease_token: Id
    lease_ms: LeaseMs


class Extended(_Frame, kw_only=True, frozen=True):
    TYPE = 17
    NAME = "EXTENDED"
    SENDER = "server"
    lease_expires_ms: EpochMs


class Unsubscribe(_Frame, kw_only=True, frozen=True):
    TYPE = 18
    NAME = "UNSUBSCRIBE"
    SENDER = "client"
    consumer: U32


class Ping(_Frame, kw_only=True, frozen=True):
    TYPE = 19
    NAME = "PING"
    SENDER = "both"


class Pong(_Frame, kw_only=True, frozen=True):
    TYPE = 20
    NAME = "PONG"
    SENDER = "both"


class Admin(_Frame, kw_only=True, frozen=True):
    TYPE = 21
    NAME = "ADMIN"
    SENDER = "client"
    op: AdminOp
    args: AdminArgs = {}


class AdminResult(_Frame, kw_only=True, frozen=True):
    TYPE = 22
    NAME = "ADMIN_RESULT"
    SENDER = "server"
    result: Any = None


class Close(_Frame, kw_only=True, frozen=True):
    TYPE = 23
    NAME = "CLOSE"
    SENDER = "both"
    code: U16
    reason: Text = ""


class Settle(_Frame, kw_only=True, frozen=True):
    """Atomic settle: ack ``acks`` and publish ``publish`` in one broker transaction, all or
    nothing. ``settle_id`` makes a retry after an unknown outcome idempotent: the same id (per
    principal) returns the first outcome, with ``duplicate``, and changes nothing."""

    TYPE = 24
    NAME = "SETTLE"
    SENDER = "client"
    settle_id: Key
    acks: Annotated[list[SettleItem], Meta(min_length=1, max_length=MAX_BATCH)]
    publish: Annotated[list[PublishItem], Meta(max_length=MAX_BATCH)] = []


class SettleConfirm(_Frame, kw_only=True, frozen=True):
    TYPE = 25
    NAME = "SETTLE_CONFIRM"
    SENDER = "server"
    #: the outputs' ids, in request order
    results: Annotated[list[Confirmed], Meta(max_length=MAX_BATCH)]
    #: this settle id had already been applied: nothing changed now
    duplicate: bool = False


Frame = (
    Hello
    | Welcome
    | Auth
    | Ok
    | Error
    | Publish
    | PublishBatch
    | Confirm
    | Subscribe
    | Subscribed
    | Credit
    | Deliver
    | Ack
    | Nack
    | Settled
    | Extend
    | Extended
    | Unsubscribe
    | Ping
    | Pong
    | Admin
    | AdminResult
    | Close
    | Settle
    | SettleConfirm
)

_ALL: tuple[type[Frame], ...] = (
    Hello,
    Welcome,
    Auth,
    Ok,
    Error,
    Publish,
    PublishBatch,
    Confirm,
    Subscribe,
    Subscribed,
    Credit,
    Deliver,
    Ack,
    Nack,
    Settled,
    Extend,
    Extended,
    Unsubscribe,
    Ping,
    Pong,
    Admin,
    AdminResult,
    Close,
    Settle,
    SettleConfirm,
)

#: Frame type number -> body struct. Numbers not in here are rejected by version 1.
FRAME_TYPES: dict[int, type[Frame]] = {cls.TYPE: cls for cls in _ALL}
assert len(FRAME_TYPES) == len(_ALL), "duplicate frame type number"


def frame_name(frame_type: int) -> str:
    """``"PUBLISH"`` for 6; ``"type 99"`` for a number version 1 does not know."""
    cls = FRAME_TYPES.get(frame_type)
    return cls.NAME if cls is not None else f"type {frame_type}"


# --- limits ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a peer may send. Defaults are the version 1 maxima; values may be lowered.

    ``max_frame`` counts the bytes after a frame's length field. It may be raised up to
    ``MAX_FRAME_CEILING`` (for larger batches) but must leave ``FRAME_OVERHEAD`` bytes beyond
    ``max_payload + max_metadata`` so that any message accepted can also be delivered.
    """

    max_frame: int = MAX_FRAME
    max_payload: int = MAX_PAYLOAD
    max_batch: int = MAX_BATCH
    max_attributes: int = MAX_ATTRIBUTES
    max_attr_key: int = MAX_ATTR_KEY
    max_attr_value: int = MAX_ATTR_VALUE
    max_name: int = MAX_NAME
    max_key: int = MAX_KEY
    max_token: int = MAX_TOKEN
    max_error_text: int = MAX_ERROR_TEXT
    max_credit: int = MAX_CREDIT
    max_metadata: int = MAX_METADATA

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"limits.{f.name} must be a positive integer, got {value!r}")
            ceiling = _CEILINGS[f.name]
            if value > ceiling:
                raise ConfigError(
                    f"limits.{f.name} = {value} exceeds the protocol maximum {ceiling}"
                )
        needed = self.max_payload + self.max_metadata + FRAME_OVERHEAD
        if self.max_frame < needed:
            raise ConfigError(
                f"limits.max_frame = {self.max_frame} is too small: it must be at least "
                f"max_payload + max_metadata + {FRAME_OVERHEAD} = {needed}"
            )


_CEILINGS: Mapping[str, int] = {
    "max_frame": MAX_FRAME_CEILING,
    "max_payload": MAX_PAYLOAD,
    "max_batch": MAX_BATCH,
    "max_attributes": MAX_ATTRIBUTES,
    "max_attr_key": MAX_ATTR_KEY,
    "max_attr_value": MAX_ATTR_VALUE,
    "max_name": MAX_NAME,
    "max_key": MAX_KEY,
    "max_token": MAX_TOKEN,
    "max_error_text": MAX_ERROR_TEXT,
    "max_credit": MAX_CREDIT,
    "max_metadata": MAX_METADATA,
}


# --- validation against configured limits ---------------------------------------------------


def _fail(frame: Frame, where: str, what: str, limit: int) -> ProtocolError:
    return ProtocolError(f"{frame.NAME} frame: `{where}` {what}, limit {limit}")


def _check_len(frame: Frame, where: str, value: str | bytes | None, limit: int) -> None:
    if value is not None and len(value) > limit:
        raise _fail(frame, where, f"has length {len(value)}", limit)


def _metadata_bytes(attributes: dict[str, str], trace_context: dict[str, str]) -> int:
    chars = 0
    for mapping in (attributes, trace_context):
        for k, v in mapping.items():
            chars += len(k) + len(v)
    if chars * 4 <= MAX_METADATA // 2:  # fast path: even all-4-byte UTF-8 would be small
        return chars
    return sum(
        len(k.encode()) + len(v.encode())
        for mapping in (attributes, trace_context)
        for k, v in mapping.items()
    )


def _check_message(
    frame: Frame,
    where: str,
    limits: Limits,
    *,
    topic: str,
    payload: bytes,
    attributes: dict[str, str],
    idempotency_key: str | None,
    ordering_key: str | None,
    trace_context: dict[str, str],
) -> None:
    _check_len(frame, f"{where}topic", topic, limits.max_name)
    _check_len(frame, f"{where}payload", payload, limits.max_payload)
    _check_len(frame, f"{where}idempotency_key", idempotency_key, limits.max_key)
    _check_len(frame, f"{where}ordering_key", ordering_key, limits.max_key)
    if len(attributes) > limits.max_attributes:
        raise _fail(
            frame, f"{where}attributes", f"has {len(attributes)} entries", limits.max_attributes
        )
    if limits.max_attr_key < MAX_ATTR_KEY or limits.max_attr_value < MAX_ATTR_VALUE:
        for k, v in attributes.items():
            _check_len(frame, f"{where}attributes key", k, limits.max_attr_key)
            _check_len(frame, f"{where}attributes[{k!r}]", v, limits.max_attr_value)
    size = _metadata_bytes(attributes, trace_context)
    if size > limits.max_metadata:
        raise _fail(
            frame,
            f"{where}attributes + {where}trace_context",
            f"total {size} bytes",
            limits.max_metadata,
        )


def _check_item(frame: Frame, where: str, item: PublishItem, limits: Limits) -> None:
    _check_message(
        frame,
        where,
        limits,
        topic=item.topic,
        payload=item.payload,
        attributes=item.attributes,
        idempotency_key=item.idempotency_key,
        ordering_key=item.ordering_key,
        trace_context=item.trace_context,
    )


def _check_batch(frame: Frame, where: str, count: int, limits: Limits) -> None:
    if count > limits.max_batch:
        raise _fail(frame, where, f"has {count} items", limits.max_batch)


def _v_publish(frame: Publish, limits: Limits) -> None:
    _check_item(frame, "message.", frame.message, limits)


def _v_publish_batch(frame: PublishBatch, limits: Limits) -> None:
    _check_batch(frame, "messages", len(frame.messages), limits)
    for i, item in enumerate(frame.messages):
        _check_item(frame, f"messages[{i}].", item, limits)


def _v_deliver(frame: Deliver, limits: Limits) -> None:
    _check_len(frame, "subscription", frame.subscription, limits.max_name)
    _check_message(
        frame,
        "",
        limits,
        topic=frame.topic,
        payload=frame.payload,
        attributes=frame.attributes,
        idempotency_key=frame.idempotency_key,
        ordering_key=frame.ordering_key,
        trace_context=frame.trace_context,
    )


def _v_ack(frame: Ack, limits: Limits) -> None:
    _check_batch(frame, "items", len(frame.items), limits)
    if limits.max_name < MAX_NAME:
        for i, item in enumerate(frame.items):
            _check_len(frame, f"items[{i}].subscription", item.subscription, limits.max_name)


def _v_nack(frame: Nack, limits: Limits) -> None:
    _check_batch(frame, "items", len(frame.items), limits)
    if limits.max_name < MAX_NAME or limits.max_error_text < MAX_ERROR_TEXT:
        for i, item in enumerate(frame.items):
            _check_len(frame, f"items[{i}].subscription", item.subscription, limits.max_name)
            _check_len(frame, f"items[{i}].error", item.error, limits.max_error_text)


def _v_settle(frame: Settle, limits: Limits) -> None:
    _check_batch(frame, "acks", len(frame.acks), limits)
    _check_batch(frame, "publish", len(frame.publish), limits)
    _check_len(frame, "settle_id", frame.settle_id, limits.max_key)
    if limits.max_name < MAX_NAME:
        for i, item in enumerate(frame.acks):
            _check_len(frame, f"acks[{i}].subscription", item.subscription, limits.max_name)
    for i, msg in enumerate(frame.publish):
        _check_item(frame, f"publish[{i}].", msg, limits)


def _v_confirm(frame: Confirm | SettleConfirm, limits: Limits) -> None:
    _check_batch(frame, "results", len(frame.results), limits)


def _v_settled(frame: Settled, limits: Limits) -> None:
    _check_batch(frame, "results", len(frame.results), limits)
    if limits.max_error_text < MAX_ERROR_TEXT:
        for i, res in enumerate(frame.results):
            _check_len(frame, f"results[{i}].message", res.message, limits.max_error_text)


def _v_subscribe(frame: Subscribe, limits: Limits) -> None:
    _check_len(frame, "subscription", frame.subscription, limits.max_name)
    if frame.credit > limits.max_credit:
        raise _fail(frame, "credit", f"is {frame.credit}", limits.max_credit)


def _v_credit(frame: Credit, limits: Limits) -> None:
    if frame.credit > limits.max_credit:
        raise _fail(frame, "credit", f"is {frame.credit}", limits.max_credit)


def _v_extend(frame: Extend, limits: Limits) -> None:
    _check_len(frame, "subscription", frame.subscription, limits.max_name)


def _v_token(frame: Hello | Auth, limits: Limits) -> None:
    _check_len(frame, "token", frame.token, limits.max_token)


def _v_error(frame: Error, limits: Limits) -> None:
    _check_len(frame, "message", frame.message, limits.max_error_text)


def _v_close(frame: Close, limits: Limits) -> None:
    _check_len(frame, "reason", frame.reason, limits.max_error_text)


def _v_none(frame: Frame, limits: Limits) -> None:
    pass


_VALIDATORS: Mapping[type[Frame], Callable[[Any, Limits], None]] = {
    Publish: _v_publish,
    PublishBatch: _v_publish_batch,
    Deliver: _v_deliver,
    Ack: _v_ack,
    Nack: _v_nack,
    Confirm: _v_confirm,
    Settle: _v_settle,
    SettleConfirm: _v_confirm,
    Settled: _v_settled,
    Subscribe: _v_subscribe,
    Credit: _v_credit,
    Extend: _v_extend,
    Hello: _v_token,
    Auth: _v_token,
    Error: _v_error,
    Close: _v_close,
}


def validate(frame: Frame, limits: Limits) -> None:
    """Check ``frame`` against configured ``limits``; raise :class:`ProtocolError` naming the field.

    The msgspec constraints already bound every field at the protocol maxima; this adds the
    deployment's (possibly lower) limits and the per-message metadata budget.
    """
    _VALIDATORS.get(type(frame), _v_none)(frame, limits)
