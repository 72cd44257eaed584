"""Carry W3C trace context in a message's ``trace_context`` map (DESIGN §4, ADR 0009).

A producer injects its span's context (``traceparent`` and, when set, ``tracestate``) into the
message; the broker stores the map with the message and hands it back in every delivery; a
consumer extracts it and links its ``process`` span to it.

The default propagator is W3C Trace Context alone, not the process-wide one: what is injected
here is stored at rest with the message, and the global default also propagates *baggage*
(arbitrary application key/values, possibly personal data) that has no business in a broker's
tables or audit trail. An application that wants its own propagator (B3, or the global
composite) passes one (``opentelemetry.propagate.get_global_textmap()``); entries that would
not fit the protocol's limits for a trace-context map are dropped rather than failing the
publish.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Link, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from securebroker.protocol.frames import MAX_ATTR_KEY, MAX_ATTR_VALUE, MAX_TRACE_ENTRIES

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"

#: W3C Trace Context only (see the module docstring for why not the global propagator)
W3C: Final[TextMapPropagator] = TraceContextTextMapPropagator()


def inject(
    carrier: MutableMapping[str, str],
    context: Context | None = None,
    *,
    propagator: TextMapPropagator | None = None,
    overwrite: bool = False,
) -> bool:
    """Write ``context`` (default: the current one) into ``carrier``; True if anything was.

    A carrier that already holds a ``traceparent`` is left alone unless ``overwrite``: the
    caller chose the message's creation context. Nothing is written when the context holds no
    valid span (no tracing configured and no incoming context), so untraced messages carry no
    made-up trace."""
    if not overwrite and carrier.get(TRACEPARENT):
        return False
    fresh: dict[str, str] = {}
    (propagator or W3C).inject(fresh, context=context)
    wrote = False
    for key, value in fresh.items():
        if len(carrier) >= MAX_TRACE_ENTRIES and key not in carrier:
            break
        if len(key) <= MAX_ATTR_KEY and len(value) <= MAX_ATTR_VALUE:
            carrier[key] = value
            wrote = True
    return wrote


def extract(
    trace_context: Mapping[str, str], *, propagator: TextMapPropagator | None = None
) -> Context:
    """The context carried by a message (an empty context when it carries none)."""
    return (propagator or W3C).extract(trace_context, context=Context())


def span_context_of(
    trace_context: Mapping[str, str], *, propagator: TextMapPropagator | None = None
) -> SpanContext | None:
    """The producer's span context carried by a message, or None (absent or malformed).

    The result has ``is_remote=True``. Its ``format(trace_id, "032x")`` is the trace id that
    ``securebroker.audit.record.trace_id_of`` reads from the same map."""
    if not trace_context:
        return None
    ctx = trace.get_current_span(extract(trace_context, propagator=propagator)).get_span_context()
    return ctx if ctx.is_valid else None


def link_to(
    trace_context: Mapping[str, str], *, propagator: TextMapPropagator | None = None
) -> Link | None:
    """A span link to the message's creation context, or None when it carries none."""
    ctx = span_context_of(trace_context, propagator=propagator)
    return None if ctx is None else Link(ctx)


def links_to(
    contexts: list[Mapping[str, str]], *, propagator: TextMapPropagator | None = None
) -> list[Link]:
    """Links to the distinct creation contexts of several messages (a batch)."""
    seen: set[tuple[int, int]] = set()
    out: list[Link] = []
    for tc in contexts:
        ctx = span_context_of(tc, propagator=propagator)
        if ctx is not None and (ctx.trace_id, ctx.span_id) not in seen:
            seen.add((ctx.trace_id, ctx.span_id))
            out.append(Link(ctx))
    return out


def trace_id_hex(trace_context: Mapping[str, str]) -> str | None:
    """The 32-hex-digit trace id a message carries, or None."""
    ctx = span_context_of(trace_context)
    return None if ctx is None else format(ctx.trace_id, "032x")


__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "W3C",
    "extract",
    "inject",
    "link_to",
    "links_to",
    "span_context_of",
    "trace_id_hex",
]
