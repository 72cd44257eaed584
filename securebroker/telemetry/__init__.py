"""OpenTelemetry tracing after the messaging semantic conventions (ADR 0009).

- ``semconv``: the attribute and span names (the one module to edit when they are renamed);
- ``propagation``: W3C trace context in a message's ``trace_context`` map;
- ``instrument``: the SDK's spans (``securebroker.client``);
- ``broker``: the broker's spans on the native front door;
- ``setup``: the broker's tracer from ``[telemetry]``.

Nothing is imported here, so importing the package costs nothing.
"""
