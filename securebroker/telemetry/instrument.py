"""The SDK's spans, following the messaging semantic conventions (ADR 0009).

``securebroker.client`` calls into ``ClientTracing``; applications only see the spans (and
``Message.process()``). Spans come from ``opentelemetry.trace.get_tracer("securebroker.client")``
on the tracer provider given to ``connect`` (default: the global one). With no OpenTelemetry SDK
configured the API hands out non-recording spans: a publish then costs a few object allocations
and injects nothing (there is no valid context to inject).

Producer side
    ``publish`` of one message: a PRODUCER span ``send {topic}``. Its context is the message's
    *creation context*, injected into the message's ``trace_context`` (``traceparent``,
    ``tracestate``). ``publish_batch`` of several: per message a PRODUCER span ``create {topic}``
    whose context is injected into that message, then one CLIENT span ``send {topic}`` (or
    ``send`` across topics) for the request, linked to every creation context, with
    ``messaging.batch.message_count``. That is the conventions' batch model: every message keeps
    a creation context of its own, so each consumer's ``process`` span links to the one message
    it handles, not to a batch that mixes unrelated messages. A message whose caller already set
    a ``traceparent`` keeps it: that is its creation context, the send span links to it, and a
    single-message send span is then CLIENT (it is not the creation context).

Consumer side
    ``with message.process():`` opens a CONSUMER span ``process {topic}`` around the
    application's handling, current while it runs (the application's own spans nest under it),
    LINKED to the message's creation context rather than parented by it: a consumer's work is a
    new trace that points back to the producer's, as the conventions recommend (a message can be
    delivered many times, long after the producer's trace ended). ``ack``/``nack`` open CLIENT
    spans ``ack {topic}``/``nack {topic}`` (``messaging.operation.type = settle``), children of
    the current span (the process span, when used) and linked to the creation context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Protocol

from opentelemetry import trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider

from securebroker import __version__
from securebroker.telemetry import propagation
from securebroker.telemetry import semconv as sc

CLIENT_SCOPE = "securebroker.client"
_NOOP_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


class Outgoing(Protocol):
    """What the SDK sends for one message (``frames.PublishItem``)."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def trace_context(self) -> MutableMapping[str, str]: ...


class Delivered(Protocol):
    """What the SDK hands the application (``client.Message``)."""

    @property
    def subscription(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def trace_context(self) -> Mapping[str, str]: ...
    @property
    def id(self) -> object: ...


def fail(span: Span, exc: BaseException, *, record: bool = False) -> None:
    """Mark ``span`` as failed with ``error.type`` (and the exception as an event if
    ``record``)."""
    if not span.is_recording():
        return
    span.set_attribute(sc.ERROR_TYPE, sc.error_type(exc))
    if record:
        span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(exc)[:256] or None))


class ClientTracing:
    """The spans of one ``Client``: its tracer, propagator and server address."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        client_id: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.tracer = trace.get_tracer(CLIENT_SCOPE, __version__, tracer_provider=tracer_provider)
        self._provider = tracer_provider
        self.propagator = propagator
        self._server: dict[str, str | int] = {sc.SERVER_ADDRESS: host, sc.SERVER_PORT: port}
        self._client_id = client_id

    def _off(self) -> bool:
        """True while no OpenTelemetry SDK backs our tracer (re-checked on every call: the
        application may install its global provider after connecting)."""
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        return isinstance(provider, _NOOP_PROVIDERS)

    def _attributes(self, operation: sc.Operation, destination: str | None) -> dict[str, str | int]:
        attrs: dict[str, str | int] = {**sc.base_attributes(operation, destination)}
        attrs.update(self._server)
        cid = self._client_id()
        if cid:
            attrs[sc.MESSAGING_CLIENT_ID] = cid
        return attrs

    # -- producer ----------------------------------------------------------------------------
    @contextmanager
    def send(self, items: Sequence[Outgoing]) -> Iterator[Span]:
        """The span of one publish request; injects creation contexts into ``items``."""
        if self._off() and not trace.get_current_span().get_span_context().is_valid:
            yield trace.INVALID_SPAN  # nothing would be recorded, and nothing is to be injected
            return
        topics = {i.topic for i in items}
        destination = next(iter(topics)) if len(topics) == 1 else None
        links: list[Link] = []
        kind = SpanKind.CLIENT
        single = len(items) == 1
        if not single:
            for item in items:
                links.extend(self._create(item))
        elif (link := self._supplied(items[0])) is not None:
            links.append(link)
        else:
            kind = SpanKind.PRODUCER  # this span is the message's creation context
        attrs = self._attributes(sc.Operation.SEND, destination)
        if single:
            attrs[sc.MESSAGING_MESSAGE_BODY_SIZE] = len(items[0].payload)
        else:
            attrs[sc.MESSAGING_BATCH_MESSAGE_COUNT] = len(items)
        with self.tracer.start_as_current_span(
            sc.span_name(sc.Operation.SEND, destination),
            kind=kind,
            attributes=attrs,
            links=links or None,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            if kind is SpanKind.PRODUCER:
                propagation.inject(items[0].trace_context, propagator=self.propagator)
            try:
                yield span
            except BaseException as exc:
                fail(span, exc)
                raise

    def _supplied(self, item: Outgoing) -> Link | None:
        """A link to the creation context the caller put in the message, if it did."""
        if not item.trace_context.get(propagation.TRACEPARENT):
            return None
        return propagation.link_to(item.trace_context, propagator=self.propagator)

    def _create(self, item: Outgoing) -> list[Link]:
        """A ``create`` span for one message of a batch (its creation context, injected),
        or the caller's own context; the link for the batch's send span."""
        if item.trace_context.get(propagation.TRACEPARENT):
            link = self._supplied(item)
            return [] if link is None else [link]
        attrs = self._attributes(sc.Operation.CREATE, item.topic)
        attrs[sc.MESSAGING_MESSAGE_BODY_SIZE] = len(item.payload)
        span = self.tracer.start_span(
            sc.span_name(sc.Operation.CREATE, item.topic),
            kind=SpanKind.PRODUCER,
            attributes=attrs,
        )
        try:
            propagation.inject(
                item.trace_context,
                trace.set_span_in_context(span),
                propagator=self.propagator,
            )
        finally:
            span.end()
        ctx = span.get_span_context()
        return [Link(ctx)] if ctx.is_valid else []

    @staticmethod
    def confirmed(span: Span, message_id: str, *, duplicate: bool) -> None:
        """Record what the broker answered for a single-message send."""
        if span.is_recording():
            span.set_attribute(sc.MESSAGING_MESSAGE_ID, message_id)
            span.set_attribute(sc.SECUREBROKER_DUPLICATE, duplicate)

    # -- consumer ----------------------------------------------------------------------------
    def _message_attributes(
        self, operation: sc.Operation, message: Delivered
    ) -> dict[str, str | int]:
        attrs = self._attributes(operation, message.topic)
        attrs[sc.MESSAGING_DESTINATION_SUBSCRIPTION_NAME] = message.subscription
        attrs[sc.MESSAGING_MESSAGE_ID] = str(message.id)
        attrs[sc.SECUREBROKER_ATTEMPT] = message.attempt
        return attrs

    @contextmanager
    def process(self, message: Delivered, *, body_size: int | None = None) -> Iterator[Span]:
        """A CONSUMER ``process`` span, current inside the block, linked to the message's
        creation context. An exception escaping the block marks the span failed (and is
        re-raised; settling the message stays the application's decision)."""
        if self._off():
            yield trace.INVALID_SPAN
            return
        link = propagation.link_to(message.trace_context, propagator=self.propagator)
        attrs = self._message_attributes(sc.Operation.PROCESS, message)
        if body_size is not None:
            attrs[sc.MESSAGING_MESSAGE_BODY_SIZE] = body_size
        with self.tracer.start_as_current_span(
            sc.span_name(sc.Operation.PROCESS, message.topic),
            kind=SpanKind.CONSUMER,
            attributes=attrs,
            links=None if link is None else [link],
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                fail(span, exc, record=True)
                raise

    @contextmanager
    def settle(self, message: Delivered, operation: sc.Operation) -> Iterator[Span]:
        """A CLIENT ``ack``/``nack`` span (``messaging.operation.type = settle``)."""
        if self._off():
            yield trace.INVALID_SPAN
            return
        with self.tracer.start_as_current_span(
            sc.span_name(operation, message.topic),
            kind=SpanKind.CLIENT,
            attributes=self._message_attributes(operation, message),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            if span.is_recording():  # parse the carried context only when it is kept
                link = propagation.link_to(message.trace_context, propagator=self.propagator)
                if link is not None:
                    span.add_link(link.context)
            try:
                yield span
            except BaseException as exc:
                fail(span, exc)
                raise


__all__ = ["CLIENT_SCOPE", "ClientTracing", "Delivered", "Outgoing", "fail"]
