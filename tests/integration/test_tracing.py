"""Tracing end to end: the real SDK, the real NativeServer over mutual TLS, real PostgreSQL.

Spans go to ``InMemorySpanExporter``s behind tracer providers made for each test and passed in
explicitly (``connect(tracer_provider=...)``, ``NativeServer(tracer=...)``); the process-wide
provider is never set. Every span the tests look at has ended before the awaited call that
produced it returned (the broker ends its spans before it sends the reply), so no test waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest
from native_fixtures import IO_TIMEOUT, NativeFactory, NativeHarness, make_queue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from securebroker.audit.record import trace_id_of
from securebroker.client import Message, OutgoingMessage, Subscription
from securebroker.config import TelemetryConfig
from securebroker.errors import StaleLease, TopicNotFound
from securebroker.telemetry.setup import BROKER_SCOPE, BrokerTracing, configure_tracing

TOPIC = "payments.orders"
SUB = "payments.orders.worker"
CALLER_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Spans:
    """A local tracer provider and what it exported."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def all(self) -> Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.all() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, [s.name for s in self.all()]
        return found[0]


@pytest.fixture
def spans() -> Iterator[Spans]:
    s = Spans()
    yield s
    s.provider.shutdown()


@pytest.fixture
def broker_tracing() -> Iterator[tuple[BrokerTracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    # ratio 0: only broker spans linked to a sampled producer are kept
    tracing = configure_tracing(
        TelemetryConfig(traces=True, sample_ratio=0.0), exporter=exporter, batch=False
    )
    assert tracing is not None
    yield tracing, exporter
    tracing.shutdown()


async def next_message(sub: Subscription) -> Message:
    async with asyncio.timeout(IO_TIMEOUT):
        return await anext(sub)


def ids(span: ReadableSpan) -> tuple[int, int]:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.trace_id, ctx.span_id


def traceparent_prefix(span: ReadableSpan) -> str:
    trace_id, span_id = ids(span)
    return f"00-{trace_id:032x}-{span_id:016x}-"


def linked(span: ReadableSpan) -> list[tuple[int, int]]:
    return [(lk.context.trace_id, lk.context.span_id) for lk in span.links]


def messaging(span: ReadableSpan, operation_type: str, operation: str) -> None:
    attrs = span.attributes or {}
    assert attrs["messaging.system"] == "securebroker"
    assert attrs["messaging.operation.type"] == operation_type
    assert attrs["messaging.operation.name"] == operation


# --------------------------------------------------------------------------------------------


async def test_consumer_process_span_links_to_the_producer_send_span(
    native: NativeHarness, spans: Spans
) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect(tracer_provider=spans.provider)
    session = client._session()
    assert session is not None

    result = await client.publish(TOPIC, b"card 4111", idempotency_key="order-1")

    send = spans.one(f"send {TOPIC}")
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is None
    messaging(send, "send", "send")
    assert send.attributes is not None
    assert send.attributes["messaging.destination.name"] == TOPIC
    assert send.attributes["messaging.message.id"] == str(result.message_id)
    assert send.attributes["messaging.message.body.size"] == len(b"card 4111")
    assert send.attributes["messaging.client.id"] == session
    assert send.attributes["server.address"] == native.host
    assert send.attributes["server.port"] == native.port
    assert send.status.status_code is StatusCode.UNSET

    sub = client.consume(SUB, credit=5)
    m = await next_message(sub)
    # the producer's context travelled with the message, through the store, end to end
    assert m.trace_context["traceparent"].startswith(traceparent_prefix(send))
    assert trace_id_of(m.trace_context) == f"{ids(send)[0]:032x}"

    with m.process() as current:
        assert current.is_recording()
        await m.ack()

    process = spans.one(f"process {TOPIC}")
    assert process.kind is SpanKind.CONSUMER
    # linked, not parented: the consumer's work is its own trace that points back
    assert linked(process) == [ids(send)]
    assert process.parent is None
    assert ids(process)[0] != ids(send)[0]
    messaging(process, "process", "process")
    assert process.attributes is not None
    assert process.attributes["messaging.destination.name"] == TOPIC
    assert process.attributes["messaging.destination.subscription.name"] == SUB
    assert process.attributes["messaging.message.id"] == str(result.message_id)
    assert process.attributes["messaging.securebroker.message.attempt"] == 1
    assert process.attributes["messaging.client.id"] == session

    ack = spans.one(f"ack {TOPIC}")
    assert ack.kind is SpanKind.CLIENT
    messaging(ack, "settle", "ack")
    assert ack.parent is not None and ack.parent.span_id == ids(process)[1]
    assert linked(ack) == [ids(send)]
    assert ack.attributes is not None
    assert ack.attributes["messaging.message.id"] == str(result.message_id)
    assert ack.attributes["messaging.destination.subscription.name"] == SUB
    assert ack.status.status_code is StatusCode.UNSET


async def test_a_traceparent_the_caller_set_is_kept(native: NativeHarness, spans: Spans) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect(tracer_provider=spans.provider)
    await client.publish(TOPIC, b"x", trace_context={"traceparent": CALLER_TRACEPARENT})

    send = spans.one(f"send {TOPIC}")
    # not the creation context: a CLIENT span linked to the caller's
    assert send.kind is SpanKind.CLIENT
    assert linked(send) == [(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7)]

    m = await next_message(client.consume(SUB))
    assert m.trace_context == {"traceparent": CALLER_TRACEPARENT}
    with m.process():
        await m.ack()
    assert linked(spans.one(f"process {TOPIC}")) == [
        (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7)
    ]


async def test_batch_publish_gives_each_message_its_own_creation_context(
    native: NativeHarness, spans: Spans
) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect(tracer_provider=spans.provider)
    app = spans.provider.get_tracer("app")
    with app.start_as_current_span("checkout") as checkout:
        results = await client.publish_batch(
            [OutgoingMessage(TOPIC, b"one"), OutgoingMessage(TOPIC, b"two")]
        )

    creates = spans.named(f"create {TOPIC}")
    assert len(creates) == 2
    send = spans.one(f"send {TOPIC}")
    assert send.kind is SpanKind.CLIENT
    messaging(send, "send", "send")
    assert send.attributes is not None
    assert send.attributes["messaging.batch.message_count"] == 2
    assert sorted(linked(send)) == sorted(ids(c) for c in creates)
    checkout_ids = (checkout.get_span_context().trace_id, checkout.get_span_context().span_id)
    for span in [*creates, send]:
        assert span.parent is not None and span.parent.span_id == checkout_ids[1]
        assert ids(span)[0] == checkout_ids[0]
    for c in creates:
        assert c.kind is SpanKind.PRODUCER
        messaging(c, "create", "create")

    sub = client.consume(SUB, credit=5)
    got = [await next_message(sub), await next_message(sub)]
    assert sorted(m.id for m in got) == sorted(r.message_id for r in results)
    by_span = {ids(c)[1]: c for c in creates}
    for m in got:
        with m.process():
            await m.ack()
    processes = spans.named(f"process {TOPIC}")
    # each consumer links to the one message it handled, not to the batch
    assert sorted(linked(p)[0] for p in processes) == sorted(ids(c) for c in creates)
    for m in got:
        (create,) = [
            c for sid, c in by_span.items() if f"-{sid:016x}-" in m.trace_context["traceparent"]
        ]
        assert create.attributes is not None
        assert create.attributes["messaging.message.body.size"] == len(m.payload)
    assert len(spans.named(f"ack {TOPIC}")) == 2


async def test_failures_are_recorded_on_process_and_settle_spans(
    native: NativeHarness, spans: Spans
) -> None:
    await make_queue(native, TOPIC, SUB)
    client = await native.connect(tracer_provider=spans.provider)
    await client.publish(TOPIC, b"x")
    m = await next_message(client.consume(SUB))

    with pytest.raises(RuntimeError, match="handler broke"), m.process():
        raise RuntimeError("handler broke")
    process = spans.one(f"process {TOPIC}")
    assert process.status.status_code is StatusCode.ERROR
    assert process.attributes is not None
    assert process.attributes["error.type"] == "RuntimeError"
    assert [e.name for e in process.events] == ["exception"]

    await m.nack("handler broke")
    nack = spans.one(f"nack {TOPIC}")
    messaging(nack, "settle", "nack")
    assert nack.kind is SpanKind.CLIENT
    assert nack.status.status_code is StatusCode.UNSET

    with pytest.raises(StaleLease):  # the nack gave the lease back
        await m.ack()
    ack = spans.one(f"ack {TOPIC}")
    assert ack.status.status_code is StatusCode.ERROR
    assert ack.attributes is not None
    assert ack.attributes["error.type"] == "stale_lease"


async def test_untraced_clients_carry_no_trace_context(native: NativeHarness) -> None:
    """No tracer provider configured anywhere: the API is a no-op and nothing is injected."""
    await make_queue(native, TOPIC, SUB)
    client = await native.connect()
    await client.publish(TOPIC, b"x")
    m = await next_message(client.consume(SUB))
    assert m.trace_context == {}
    with m.process() as span:
        assert not span.is_recording()
        await m.ack()


async def test_broker_spans_link_to_the_producer(
    native_factory: NativeFactory,
    spans: Spans,
    broker_tracing: tuple[BrokerTracing, InMemorySpanExporter],
) -> None:
    tracing, exported = broker_tracing
    native = await native_factory(tracer=tracing.tracer)
    await make_queue(native, TOPIC, SUB)
    client = await native.connect(tracer_provider=spans.provider)
    session = client._session()

    result = await client.publish(TOPIC, b"card 4111")
    send = spans.one(f"send {TOPIC}")
    sub = client.consume(SUB, credit=5)
    m = await next_message(sub)
    await m.ack()

    broker = {s.name: s for s in exported.get_finished_spans()}
    assert set(broker) == {f"publish {TOPIC}", f"deliver {TOPIC}", f"ack {TOPIC}"}
    for span in broker.values():
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == BROKER_SCOPE
        assert span.parent is None  # broker spans start traces of their own ...
        assert span.attributes is not None
        assert span.attributes["messaging.client.id"] == session
        assert span.attributes["server.port"] == native.port
        assert span.status.status_code is StatusCode.UNSET

    publish = broker[f"publish {TOPIC}"]
    assert publish.kind is SpanKind.SERVER
    messaging(publish, "receive", "publish")
    assert linked(publish) == [ids(send)]  # ... linked to the producer's
    assert publish.attributes is not None
    assert publish.attributes["messaging.message.id"] == str(result.message_id)
    assert publish.attributes["messaging.destination.name"] == TOPIC

    deliver = broker[f"deliver {TOPIC}"]
    assert deliver.kind is SpanKind.PRODUCER
    messaging(deliver, "send", "deliver")
    assert linked(deliver) == [ids(send)]
    assert deliver.attributes is not None
    assert deliver.attributes["messaging.destination.subscription.name"] == SUB
    assert deliver.attributes["messaging.message.id"] == str(result.message_id)
    assert deliver.attributes["messaging.securebroker.message.attempt"] == 1

    ack = broker[f"ack {TOPIC}"]
    assert ack.kind is SpanKind.SERVER
    messaging(ack, "settle", "ack")
    assert linked(ack) == [ids(send)]  # remembered from the DELIVER on this connection
    assert ack.attributes is not None
    assert ack.attributes["messaging.message.id"] == str(m.id)
    assert ack.attributes["messaging.destination.subscription.name"] == SUB


async def test_broker_spans_of_failed_requests_and_unsampled_producers(
    native_factory: NativeFactory,
    spans: Spans,
    broker_tracing: tuple[BrokerTracing, InMemorySpanExporter],
) -> None:
    tracing, exported = broker_tracing
    native = await native_factory(tracer=tracing.tracer)
    await make_queue(native, TOPIC, SUB)

    # an untraced producer: nothing links the broker's spans to a sampled trace, and the
    # broker's own ratio (0 here) keeps none of them
    untraced = await native.connect()
    await untraced.publish(TOPIC, b"x")
    assert exported.get_finished_spans() == ()

    traced = await native.connect(tracer_provider=spans.provider)
    with pytest.raises(TopicNotFound):
        await traced.publish("no.such.topic", b"x")
    (publish,) = exported.get_finished_spans()
    assert publish.name == "publish no.such.topic"
    assert publish.status.status_code is StatusCode.ERROR
    assert publish.attributes is not None
    assert publish.attributes["error.type"] == "topic_not_found"
    send = spans.one("send no.such.topic")
    assert send.attributes is not None
    assert send.attributes["error.type"] == "topic_not_found"
    assert linked(publish) == [ids(send)]
