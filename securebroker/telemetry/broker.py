"""The broker's own spans on the native front door (``[telemetry] traces``; ADR 0009).

``NativeServer.tracer`` is None unless traces are on, and each call site in
``securebroker/server/native.py`` is guarded by one ``is None`` check, so a broker without
tracing never reaches this module's functions.

- ``publish {topic}`` (SERVER, ``messaging.operation.type = receive``): one per PUBLISH or
  PUBLISH_BATCH frame, from its arrival until its commit resolves (confirm or error), linked to
  every distinct creation context its messages carry.
- ``deliver {topic}`` (PRODUCER, ``send``): one per DELIVER frame sent to a consumer, linked to the
  message's creation context, with subscription, message id and attempt.
- ``ack {topic}`` / ``nack {topic}`` (SERVER, ``settle``): one per ACK or NACK frame, until its
  transaction resolves, linked to the creation contexts of the messages it settles (remembered
  from their DELIVER on the same connection, at most ``REMEMBERED`` per connection);
  ``messaging.securebroker.batch.failed_count`` counts the items refused.

Broker spans are never children of a producer's span (a request frame carries no request-level
context, and one frame may hold messages of many traces): each starts a short trace of its own and
links to the producers' contexts. The sampler from ``telemetry.setup`` keeps a broker span whenever
a linked context was sampled.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from securebroker.core.model import Delivery
from securebroker.protocol import frames as f
from securebroker.telemetry import propagation
from securebroker.telemetry import semconv as sc
from securebroker.telemetry.instrument import fail

if TYPE_CHECKING:
    from securebroker.server.native import Connection

#: creation contexts remembered per connection between a DELIVER and its settle (the oldest go
#: first: a lease that expired unsettled leaves its entry behind)
REMEMBERED: Final = 16_384
_delivered: weakref.WeakKeyDictionary[Connection, dict[str, Mapping[str, str]]] = (
    weakref.WeakKeyDictionary()
)


def _attributes(
    conn: Connection, operation: sc.Operation, destination: str | None
) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {**sc.base_attributes(operation, destination)}
    attrs[sc.SERVER_ADDRESS] = conn.server.settings.host
    attrs[sc.SERVER_PORT] = conn.server.port
    attrs[sc.MESSAGING_CLIENT_ID] = conn.session
    return attrs


# -- publish -----------------------------------------------------------------------------------
def start_publish(tracer: Tracer, items: Sequence[f.PublishItem], conn: Connection) -> Span:
    topics = {i.topic for i in items}
    destination = next(iter(topics)) if len(topics) == 1 else None
    attrs = _attributes(conn, sc.Operation.PUBLISH, destination)
    if len(items) > 1:
        attrs[sc.MESSAGING_BATCH_MESSAGE_COUNT] = len(items)
    else:
        attrs[sc.MESSAGING_MESSAGE_BODY_SIZE] = len(items[0].payload)
    return tracer.start_span(
        sc.span_name(sc.Operation.PUBLISH, destination),
        kind=SpanKind.SERVER,
        attributes=attrs,
        links=propagation.links_to([i.trace_context for i in items]) or None,
    )


def end_publish(span: Span, fut: asyncio.Future[Any]) -> None:
    """Done callback of a publish's commit: record its outcome and end the span."""
    if fut.cancelled():
        fail(span, asyncio.CancelledError("broker is shutting down"))
    elif (exc := fut.exception()) is not None:
        fail(span, exc)
    else:
        results = fut.result()
        if len(results) == 1 and span.is_recording():
            span.set_attribute(sc.MESSAGING_MESSAGE_ID, str(results[0].message_id))
            span.set_attribute(sc.SECUREBROKER_DUPLICATE, bool(results[0].duplicate))
    span.end()


def end_with_error(span: Span, exc: BaseException) -> None:
    fail(span, exc)
    span.end()


# -- deliver -----------------------------------------------------------------------------------
def delivered(tracer: Tracer, d: Delivery, conn: Connection) -> None:
    """A span for one DELIVER frame just queued to the consumer's connection."""
    attrs = _attributes(conn, sc.Operation.DELIVER, d.topic)
    attrs[sc.MESSAGING_DESTINATION_SUBSCRIPTION_NAME] = d.subscription
    attrs[sc.MESSAGING_MESSAGE_ID] = str(d.message_id)
    attrs[sc.SECUREBROKER_ATTEMPT] = d.attempt
    attrs[sc.MESSAGING_MESSAGE_BODY_SIZE] = len(d.payload)
    link = propagation.link_to(d.trace_context)
    span = tracer.start_span(
        sc.span_name(sc.Operation.DELIVER, d.topic),
        kind=SpanKind.PRODUCER,
        attributes=attrs,
        links=None if link is None else [link],
    )
    if d.payload_error is not None and span.is_recording():
        span.set_attribute(sc.ERROR_TYPE, d.payload_error)
    span.end()
    if link is not None:
        remembered = _delivered.setdefault(conn, {})
        if len(remembered) >= REMEMBERED:
            del remembered[next(iter(remembered))]
        remembered[str(d.message_id)] = d.trace_context


# -- settle ------------------------------------------------------------------------------------
def start_settle(tracer: Tracer, frame: f.Frame, conn: Connection) -> Span | None:
    """A span for an ACK or NACK frame (None for other requests)."""
    if isinstance(frame, f.Ack):
        operation, items = sc.Operation.ACK, [(i.subscription, i.message_id) for i in frame.items]
    elif isinstance(frame, f.Nack):
        operation, items = sc.Operation.NACK, [(i.subscription, i.message_id) for i in frame.items]
    elif isinstance(frame, f.Settle):  # atomic settle: acks (and outputs) in one transaction
        operation, items = sc.Operation.ACK, [(i.subscription, i.message_id) for i in frame.acks]
    else:
        return None
    subscriptions = {s for s, _ in items}
    subscription = next(iter(subscriptions)) if len(subscriptions) == 1 else None
    topic = None
    if subscription is not None:
        topic = next(
            (c.topic for c in conn.consumers.values() if c.subscription == subscription), None
        )
    attrs = _attributes(conn, operation, topic)
    if subscription is not None:
        attrs[sc.MESSAGING_DESTINATION_SUBSCRIPTION_NAME] = subscription
    if len(items) == 1:
        attrs[sc.MESSAGING_MESSAGE_ID] = items[0][1]
    else:
        attrs[sc.MESSAGING_BATCH_MESSAGE_COUNT] = len(items)
    remembered = _delivered.get(conn, {})
    carried = [tc for _, mid in items if (tc := remembered.pop(mid, None)) is not None]
    return tracer.start_span(
        sc.span_name(operation, topic),
        kind=SpanKind.SERVER,
        attributes=attrs,
        links=propagation.links_to(carried) or None,
    )


def end_settle(span: Span, reply: f.Frame) -> None:
    """Record the reply to a settle (per-item results, or an error for the whole frame)."""
    if span.is_recording():
        if isinstance(reply, f.Settled):
            failed = [r for r in reply.results if not r.ok]
            if failed:
                span.set_attribute(sc.SECUREBROKER_FAILED_COUNT, len(failed))
            if failed and len(failed) == len(reply.results):
                span.set_attribute(sc.ERROR_TYPE, failed[0].name or "error")
                span.set_status(Status(StatusCode.ERROR, failed[0].message[:256] or None))
        elif isinstance(reply, f.Error):
            span.set_attribute(sc.ERROR_TYPE, reply.name or "error")
            span.set_status(Status(StatusCode.ERROR, reply.message[:256] or None))
    span.end()


__all__ = [
    "delivered",
    "end_publish",
    "end_settle",
    "end_with_error",
    "start_publish",
    "start_settle",
]
