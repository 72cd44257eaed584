"""Tracing building blocks (securebroker/telemetry): semantic-convention names, W3C trace-context
propagation through a message's ``trace_context``, the ``[telemetry]`` config section and the
broker's tracer setup. Tracer providers here are local to each test (never the global one)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import messaging_attributes as m
from opentelemetry.semconv._incubating.attributes.messaging_attributes import (
    MessagingOperationTypeValues,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState

from securebroker.audit.record import trace_id_of
from securebroker.config import Config, TelemetryConfig, dump, load
from securebroker.errors import ConfigError, StaleLease
from securebroker.protocol.frames import MAX_ATTR_VALUE, MAX_TRACE_ENTRIES, PublishItem
from securebroker.telemetry import propagation
from securebroker.telemetry import semconv as sc
from securebroker.telemetry.instrument import ClientTracing
from securebroker.telemetry.setup import (
    BROKER_SCOPE,
    configure_tracing,
    linked_sampler,
    otlp_exporter,
    traces_url,
)

DSN = "postgresql://broker@db.internal:5432/securebroker"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    yield p
    p.shutdown()


# -- semantic conventions ----------------------------------------------------------------------
def test_attribute_names_follow_the_messaging_conventions() -> None:
    assert sc.MESSAGING_SYSTEM == "messaging.system"
    assert sc.MESSAGING_OPERATION_TYPE == "messaging.operation.type"
    assert sc.MESSAGING_OPERATION_NAME == "messaging.operation.name"
    assert sc.MESSAGING_DESTINATION_NAME == "messaging.destination.name"
    assert sc.MESSAGING_DESTINATION_SUBSCRIPTION_NAME == "messaging.destination.subscription.name"
    assert sc.MESSAGING_MESSAGE_ID == "messaging.message.id"
    assert sc.MESSAGING_MESSAGE_BODY_SIZE == "messaging.message.body.size"
    assert sc.MESSAGING_BATCH_MESSAGE_COUNT == "messaging.batch.message_count"
    assert sc.MESSAGING_CLIENT_ID == "messaging.client.id"
    assert sc.SERVER_ADDRESS == "server.address"
    assert sc.SERVER_PORT == "server.port"
    assert sc.ERROR_TYPE == "error.type"
    assert sc.SYSTEM == "securebroker"
    # system-specific attributes live under messaging.{system}.*
    for name in (sc.SECUREBROKER_ATTEMPT, sc.SECUREBROKER_DUPLICATE, sc.SECUREBROKER_FAILED_COUNT):
        assert name.startswith("messaging.securebroker.")


def test_names_come_from_the_installed_semconv_package_with_literal_fallbacks() -> None:
    assert sc.MESSAGING_OPERATION_TYPE == m.MESSAGING_OPERATION_TYPE
    assert sc.MESSAGING_DESTINATION_NAME == m.MESSAGING_DESTINATION_NAME
    assert sc._name("no.such.module", "X", "fallback.name") == "fallback.name"
    assert sc._name(sc._MESSAGING, "NO_SUCH_CONSTANT", "fallback.name") == "fallback.name"


def test_operation_types_are_values_the_conventions_define() -> None:
    known = {v.value for v in MessagingOperationTypeValues}
    assert {t.value for t in sc.OperationType} <= known
    assert sc.Operation.SEND.type is sc.OperationType.SEND
    assert sc.Operation.CREATE.type is sc.OperationType.CREATE
    assert sc.Operation.PROCESS.type is sc.OperationType.PROCESS
    assert sc.Operation.ACK.type is sc.OperationType.SETTLE
    assert sc.Operation.NACK.type is sc.OperationType.SETTLE
    assert sc.Operation.PUBLISH.type is sc.OperationType.RECEIVE
    assert sc.Operation.DELIVER.type is sc.OperationType.SEND


def test_span_names_and_base_attributes() -> None:
    assert sc.span_name(sc.Operation.SEND, "payments.orders") == "send payments.orders"
    assert sc.span_name(sc.Operation.PROCESS, "payments.orders") == "process payments.orders"
    assert sc.span_name(sc.Operation.ACK, "payments.orders") == "ack payments.orders"
    assert sc.span_name(sc.Operation.SEND) == "send"  # a batch across topics
    assert sc.base_attributes(sc.Operation.NACK, "a.b") == {
        "messaging.system": "securebroker",
        "messaging.operation.type": "settle",
        "messaging.operation.name": "nack",
        "messaging.destination.name": "a.b",
    }
    assert "messaging.destination.name" not in sc.base_attributes(sc.Operation.SEND)


def test_error_type_is_the_catalogue_code_or_the_class_name() -> None:
    class LocalError(Exception):
        pass

    assert sc.error_type(StaleLease("lease moved on")) == "stale_lease"
    assert sc.error_type(ValueError("x")) == "ValueError"
    assert sc.error_type(LocalError()) == f"{__name__}.{LocalError.__qualname__}"


# -- propagation -------------------------------------------------------------------------------
def test_inject_extract_round_trip(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    carrier: dict[str, str] = {}
    with tracer.start_as_current_span("send") as span:
        assert propagation.inject(carrier)
    ctx = span.get_span_context()
    assert carrier["traceparent"].startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")

    got = propagation.span_context_of(carrier)
    assert got is not None
    assert (got.trace_id, got.span_id, got.is_remote) == (ctx.trace_id, ctx.span_id, True)
    assert got.trace_flags.sampled
    link = propagation.link_to(carrier)
    assert link is not None and link.context.span_id == ctx.span_id
    # the audit trail reads the same trace id from the same map
    assert propagation.trace_id_hex(carrier) == trace_id_of(carrier) == f"{ctx.trace_id:032x}"
    # extract gives a context whose current span is the remote producer's
    remote = trace.get_current_span(propagation.extract(carrier)).get_span_context()
    assert remote.span_id == ctx.span_id


def test_tracestate_travels_too() -> None:
    state = TraceState([("vendor", "value"), ("other", "x")])
    ctx = SpanContext(
        TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1), trace_state=state
    )
    carrier: dict[str, str] = {}
    assert propagation.inject(carrier, trace.set_span_in_context(NonRecordingSpan(ctx)))
    assert carrier == {"traceparent": TRACEPARENT, "tracestate": "vendor=value,other=x"}
    got = propagation.span_context_of(carrier)
    assert got is not None and got.trace_state == state


def test_inject_keeps_a_traceparent_the_caller_set(provider: TracerProvider) -> None:
    carrier = {"traceparent": TRACEPARENT}
    with provider.get_tracer("test").start_as_current_span("send"):
        assert not propagation.inject(carrier)
        assert carrier == {"traceparent": TRACEPARENT}
        assert propagation.inject(carrier, overwrite=True)
    assert carrier["traceparent"] != TRACEPARENT


def test_nothing_is_injected_without_a_valid_context() -> None:
    carrier: dict[str, str] = {}
    assert not propagation.inject(carrier, Context())
    assert carrier == {}
    # ... nor when the current span is the API's no-op one
    with trace.NoOpTracer().start_as_current_span("noop"):
        assert not propagation.inject(carrier)
    assert carrier == {}


@pytest.mark.parametrize(
    "carried",
    [
        {},
        {"traceparent": ""},
        {"traceparent": "garbage"},
        {"traceparent": f"00-{0:032x}-{SPAN_ID:016x}-01"},  # all-zero trace id
        {"traceparent": f"00-{TRACE_ID:032x}-{0:016x}-01"},  # all-zero span id
        {"tracestate": "vendor=value"},
    ],
)
def test_malformed_or_missing_context_extracts_as_none(carried: dict[str, str]) -> None:
    assert propagation.span_context_of(carried) is None
    assert propagation.link_to(carried) is None
    assert propagation.trace_id_hex(carried) is None


def test_links_to_a_batch_are_distinct() -> None:
    other = f"00-{TRACE_ID:032x}-{SPAN_ID + 1:016x}-00"
    links = propagation.links_to(
        [{"traceparent": TRACEPARENT}, {}, {"traceparent": TRACEPARENT}, {"traceparent": other}]
    )
    assert [(lk.context.trace_id, lk.context.span_id) for lk in links] == [
        (TRACE_ID, SPAN_ID),
        (TRACE_ID, SPAN_ID + 1),
    ]
    assert not links[1].context.trace_flags.sampled


class NoisyPropagator(TextMapPropagator):
    """Injects a valid traceparent plus entries that do not fit a message's trace context."""

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        setter.set(carrier, "traceparent", TRACEPARENT)
        setter.set(carrier, "baggage", "x" * (MAX_ATTR_VALUE + 1))
        setter.set(carrier, "k" * 200, "too long a key")
        for i in range(MAX_TRACE_ENTRIES + 4):
            setter.set(carrier, f"extra-{i}", "v")

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        return Context()

    @property
    def fields(self) -> set[str]:
        return {"traceparent"}


def test_a_custom_propagator_is_bounded_by_the_protocol_limits() -> None:
    carrier: MutableMapping[str, str] = {}
    assert propagation.inject(carrier, Context(), propagator=NoisyPropagator())
    assert carrier["traceparent"] == TRACEPARENT
    assert "baggage" not in carrier
    assert all(len(k) <= 128 for k in carrier)
    assert len(carrier) == MAX_TRACE_ENTRIES


def test_the_default_propagator_leaves_baggage_out(provider: TracerProvider) -> None:
    ctx = baggage.set_baggage("customer", "alice@example.com")
    carrier: dict[str, str] = {}
    with provider.get_tracer("test").start_as_current_span("send", context=ctx):
        propagation.inject(carrier)
    assert set(carrier) == {"traceparent"}


# -- configuration -----------------------------------------------------------------------------
def load_text(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> Config:
    path = tmp_path / "broker.toml"
    path.write_text(f'[database]\ndsn = "{DSN}"\n{text}', encoding="utf-8")
    return load(path, environ or {})


def test_telemetry_defaults_are_off(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "").telemetry
    assert cfg == TelemetryConfig()
    assert (cfg.traces, cfg.otlp_endpoint, cfg.service_name, cfg.sample_ratio) == (
        False,
        None,
        "securebroker",
        1.0,
    )


def test_telemetry_section_and_environment(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[telemetry]\ntraces = true\notlp_endpoint = "https://otel.internal:4318"\n'
        'service_name = "broker-eu"\n',
        {"SECUREBROKER_TELEMETRY__SAMPLE_RATIO": "0.25"},
    ).telemetry
    assert cfg.traces is True
    assert cfg.otlp_endpoint == "https://otel.internal:4318"
    assert cfg.service_name == "broker-eu"
    assert cfg.sample_ratio == 0.25


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("sample_ratio = 1.5", "telemetry.sample_ratio", "between 0 and 1"),
        ("sample_ratio = -0.1", "telemetry.sample_ratio", "between 0 and 1"),
        ("sample_ratio = nan", "telemetry.sample_ratio", "between 0 and 1"),
        ('otlp_endpoint = "collector:4318"', "telemetry.otlp_endpoint", "http://"),
        ('otlp_endpoint = "ftp://collector"', "telemetry.otlp_endpoint", "http://"),
        ('otlp_endpoint = "http://"', "telemetry.otlp_endpoint", "with a host"),
        ('otlp_endpoint = "http://collector:port"', "telemetry.otlp_endpoint", "http://"),
        ('service_name = "  "', "telemetry.service_name", "must not be empty"),
        ('traces = "maybe"', "telemetry.traces", "Expected `bool`"),
        ("tracing = true", "telemetry.tracing", "unknown setting"),
    ],
)
def test_telemetry_config_errors_name_the_key(
    tmp_path: Path, text: str, key: str, why: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, f"[telemetry]\n{text}\n")
    message = str(err.value)
    assert message.startswith(f"{key}:"), message
    assert why in message


def test_dump_round_trips_an_unset_endpoint(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[telemetry]\ntraces = true\n")
    path = tmp_path / "dumped.toml"
    path.write_text(dump(cfg), encoding="utf-8")
    assert load(path, {}).telemetry == cfg.telemetry


# -- the broker's tracer -----------------------------------------------------------------------
def test_tracing_off_builds_nothing() -> None:
    assert configure_tracing(TelemetryConfig()) is None


def test_tracing_on_exports_with_resource_and_scope(exporter: InMemorySpanExporter) -> None:
    tracing = configure_tracing(
        TelemetryConfig(traces=True, service_name="broker-test"), exporter=exporter, batch=False
    )
    assert tracing is not None
    try:
        with tracing.tracer.start_as_current_span("publish a.b", kind=SpanKind.SERVER):
            pass
        (span,) = exporter.get_finished_spans()
        assert span.resource.attributes["service.name"] == "broker-test"
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == BROKER_SCOPE
    finally:
        tracing.shutdown()
    # the global provider was left alone
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


def test_invalid_config_is_refused_when_tracing_is_built() -> None:
    with pytest.raises(ConfigError, match=r"telemetry\.sample_ratio"):
        configure_tracing(
            TelemetryConfig(traces=True, sample_ratio=2.0), exporter=InMemorySpanExporter()
        )


def test_linked_sampler_follows_the_producers() -> None:
    sampler = linked_sampler(0.0)
    sampled = trace.Link(SpanContext(TRACE_ID, SPAN_ID, True, TraceFlags(1)))
    unsampled = trace.Link(SpanContext(TRACE_ID, SPAN_ID, True, TraceFlags(0)))
    assert sampler.should_sample(
        None, 1, "publish a.b", links=[unsampled, sampled]
    ).decision.is_sampled()
    assert not sampler.should_sample(
        None, 1, "publish a.b", links=[unsampled]
    ).decision.is_sampled()
    assert not sampler.should_sample(None, 1, "publish a.b").decision.is_sampled()
    assert linked_sampler(1.0).should_sample(None, 1, "publish a.b").decision.is_sampled()
    # a sampled parent wins over an unsampled link, an unsampled parent over a sampled link
    parent = trace.set_span_in_context(NonRecordingSpan(sampled.context))
    assert sampler.should_sample(parent, TRACE_ID, "x", links=[unsampled]).decision.is_sampled()
    parent = trace.set_span_in_context(NonRecordingSpan(unsampled.context))
    assert not sampler.should_sample(parent, TRACE_ID, "x", links=[sampled]).decision.is_sampled()


def test_otlp_endpoint_gets_the_traces_path() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://c/otlp/v1/traces") == "https://c/otlp/v1/traces"
    assert traces_url("https://c/otlp") == "https://c/otlp/v1/traces"


def test_otlp_exporter_is_built_lazily_without_connecting() -> None:
    exporter: Any = otlp_exporter("http://127.0.0.1:4318")
    try:
        assert isinstance(exporter, OTLPSpanExporter)
        assert exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
    finally:
        exporter.shutdown()


def test_missing_exporter_package_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match="opentelemetry-exporter-otlp-proto-http"):
        otlp_exporter(None)


# -- the SDK's spans without an OpenTelemetry SDK ----------------------------------------------
def test_untraced_send_injects_only_an_ambient_context() -> None:
    """No tracer provider anywhere: nothing is made up, but a context the application already
    has (propagated in from elsewhere) still travels with the message."""
    tracing = ClientTracing(host="127.0.0.1", port=7878)
    assert tracing._off()
    item = PublishItem(topic="a.b", payload=b"x", trace_context={})
    with tracing.send([item]) as span:
        assert not span.is_recording()
    assert item.trace_context == {}

    ambient = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, True, TraceFlags(1)))
    with trace.use_span(ambient), tracing.send([item]):
        pass
    assert item.trace_context == {"traceparent": TRACEPARENT}


def test_an_explicit_provider_is_used(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracing = ClientTracing(host="127.0.0.1", port=7878, tracer_provider=provider)
    assert not tracing._off()
    item = PublishItem(topic="a.b", payload=b"xyz", trace_context={})
    with tracing.send([item]) as span:
        ClientTracing.confirmed(span, "m-1", duplicate=True)
    (sent,) = exporter.get_finished_spans()
    assert sent.name == "send a.b"
    assert sent.attributes is not None
    assert sent.attributes["messaging.message.id"] == "m-1"
    assert sent.attributes["messaging.securebroker.message.duplicate"] is True
    assert "messaging.client.id" not in sent.attributes  # not connected
    assert propagation.span_context_of(item.trace_context) is not None
