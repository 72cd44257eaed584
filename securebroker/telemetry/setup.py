"""Build the broker's tracer from ``[telemetry]`` (docs/operations.md "Tracing", ADR 0009).

``configure_tracing`` returns None when ``traces`` is off, before importing the OpenTelemetry
SDK: the server then holds no tracer and every span site is one ``is None`` check.

When on, the broker gets a ``TracerProvider`` of its own (the process-wide global one is left
alone unless asked for) with:

- a resource naming the service (``service.name`` from config, ``service.version``), merged with
  ``OTEL_RESOURCE_ATTRIBUTES``;
- a sampler that follows the producers: a broker span has no parent (it *links* to the
  producers' contexts), so plain parent-based sampling would sample it independently of the
  trace it belongs to. ``LinkedSampler`` keeps a span whose parent or any linked context was
  sampled, and otherwise keeps ``sample_ratio`` of them;
- batched OTLP/HTTP export (``opentelemetry-exporter-otlp-proto-http``) to ``otlp_endpoint``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace

from securebroker import __version__
from securebroker.config import TelemetryConfig
from securebroker.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Link, SpanKind, Tracer
    from opentelemetry.trace.span import TraceState
    from opentelemetry.util.types import Attributes

#: instrumentation scope of the broker's own spans
BROKER_SCOPE: Final = "securebroker.broker"
OTLP_TRACES_PATH: Final = "/v1/traces"


@dataclass(frozen=True)
class BrokerTracing:
    """The broker's tracer and the provider behind it (shut it down to flush at exit)."""

    provider: TracerProvider
    tracer: Tracer

    def shutdown(self) -> None:
        self.provider.shutdown()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a collector base URL (``/v1/traces`` appended once)."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if not path.endswith(OTLP_TRACES_PATH):
        path += OTLP_TRACES_PATH
    return urlunsplit(parts._replace(path=path))


def otlp_exporter(endpoint: str | None) -> SpanExporter:
    """An OTLP/HTTP span exporter; ``endpoint`` None leaves it to the exporter's defaults and
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )
    except ImportError as exc:
        raise ConfigError(
            "telemetry.traces: exporting spans needs the opentelemetry-exporter-otlp-proto-http "
            "package, which is not installed (pip install opentelemetry-exporter-otlp-proto-http)"
        ) from exc
    return OTLPSpanExporter(endpoint=None if endpoint is None else traces_url(endpoint))


def linked_sampler(ratio: float) -> Sampler:
    """Parent-based, then link-based, then ``ratio`` of new traces (see the module docstring)."""
    from opentelemetry.sdk.trace.sampling import (  # noqa: PLC0415
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )

    ratio_sampler = TraceIdRatioBased(ratio)

    class LinkedSampler(Sampler):
        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            if links and any(link.context.trace_flags.sampled for link in links):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
            return ratio_sampler.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"LinkedSampler{{{ratio_sampler.get_description()}}}"

    return ParentBased(root=LinkedSampler())


def configure_tracing(
    cfg: TelemetryConfig,
    *,
    exporter: SpanExporter | None = None,
    batch: bool = True,
    set_global: bool = False,
) -> BrokerTracing | None:
    """The broker's tracing per ``cfg``, or None when ``cfg.traces`` is off.

    ``exporter`` replaces OTLP export (tests pass an ``InMemorySpanExporter`` with
    ``batch=False`` so spans are exported as they end). ``set_global`` also installs the
    provider as the process-wide one (OpenTelemetry allows that once per process)."""
    if not cfg.traces:
        return None
    cfg.validate()
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SimpleSpanProcessor,
    )

    if exporter is None:
        exporter = otlp_exporter(cfg.otlp_endpoint)
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": cfg.service_name, "service.version": __version__}
        ),
        sampler=linked_sampler(cfg.sample_ratio),
    )
    provider.add_span_processor(
        BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    )
    if set_global:
        trace.set_tracer_provider(provider)
    return BrokerTracing(provider, provider.get_tracer(BROKER_SCOPE, __version__))


__all__ = [
    "BROKER_SCOPE",
    "BrokerTracing",
    "configure_tracing",
    "linked_sampler",
    "otlp_exporter",
    "traces_url",
]
