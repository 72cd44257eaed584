"""The one place that names OpenTelemetry's messaging semantic conventions (ADR 0009).

The messaging conventions are still experimental: their attribute names live in
``opentelemetry.semconv._incubating`` and have been renamed before
(``messaging.operation`` became ``messaging.operation.type``). Everything else in securebroker
uses the constants and helpers below, so following a rename is one edit here. Where the
installed ``opentelemetry-semantic-conventions`` defines a name it is taken from there; the
literal beside it is the fallback for versions that lack (or moved) it, and a unit test checks
that both agree.
"""

from __future__ import annotations

import enum
import importlib
from typing import Final


def _name(module: str, constant: str, fallback: str) -> str:
    try:
        value = getattr(importlib.import_module(module), constant, None)
    except ImportError:
        return fallback
    return value if isinstance(value, str) else fallback


_MESSAGING: Final = "opentelemetry.semconv._incubating.attributes.messaging_attributes"
_SERVER: Final = "opentelemetry.semconv.attributes.server_attributes"
_ERROR: Final = "opentelemetry.semconv.attributes.error_attributes"

# -- attribute names -----------------------------------------------------------------------------
MESSAGING_SYSTEM: Final = _name(_MESSAGING, "MESSAGING_SYSTEM", "messaging.system")
MESSAGING_OPERATION_TYPE: Final = _name(
    _MESSAGING, "MESSAGING_OPERATION_TYPE", "messaging.operation.type"
)
MESSAGING_OPERATION_NAME: Final = _name(
    _MESSAGING, "MESSAGING_OPERATION_NAME", "messaging.operation.name"
)
MESSAGING_DESTINATION_NAME: Final = _name(
    _MESSAGING, "MESSAGING_DESTINATION_NAME", "messaging.destination.name"
)
MESSAGING_DESTINATION_SUBSCRIPTION_NAME: Final = _name(
    _MESSAGING,
    "MESSAGING_DESTINATION_SUBSCRIPTION_NAME",
    "messaging.destination.subscription.name",
)
MESSAGING_MESSAGE_ID: Final = _name(_MESSAGING, "MESSAGING_MESSAGE_ID", "messaging.message.id")
MESSAGING_MESSAGE_BODY_SIZE: Final = _name(
    _MESSAGING, "MESSAGING_MESSAGE_BODY_SIZE", "messaging.message.body.size"
)
MESSAGING_BATCH_MESSAGE_COUNT: Final = _name(
    _MESSAGING, "MESSAGING_BATCH_MESSAGE_COUNT", "messaging.batch.message_count"
)
MESSAGING_CLIENT_ID: Final = _name(_MESSAGING, "MESSAGING_CLIENT_ID", "messaging.client.id")
SERVER_ADDRESS: Final = _name(_SERVER, "SERVER_ADDRESS", "server.address")
SERVER_PORT: Final = _name(_SERVER, "SERVER_PORT", "server.port")
ERROR_TYPE: Final = _name(_ERROR, "ERROR_TYPE", "error.type")

#: system-specific attributes (the conventions reserve ``messaging.{system}.*`` for them)
SECUREBROKER_ATTEMPT: Final = "messaging.securebroker.message.attempt"
SECUREBROKER_DUPLICATE: Final = "messaging.securebroker.message.duplicate"
SECUREBROKER_FAILED_COUNT: Final = "messaging.securebroker.batch.failed_count"

#: the value of ``messaging.system``
SYSTEM: Final = "securebroker"


class OperationType(enum.StrEnum):
    """Values of ``messaging.operation.type`` that securebroker uses."""

    CREATE = "create"
    SEND = "send"
    RECEIVE = "receive"
    PROCESS = "process"
    SETTLE = "settle"


class Operation(enum.StrEnum):
    """Values of ``messaging.operation.name`` (system-specific, and the first word of the span
    name), each with its ``messaging.operation.type``."""

    CREATE = "create"  # SDK: one message of a batch publish
    SEND = "send"  # SDK: a publish request
    PROCESS = "process"  # SDK: the application handles a delivered message
    ACK = "ack"  # SDK and broker: settle for good
    NACK = "nack"  # SDK and broker: give back for redelivery
    PUBLISH = "publish"  # broker: a PUBLISH / PUBLISH_BATCH request frame arrives
    DELIVER = "deliver"  # broker: a DELIVER frame goes out to a consumer

    @property
    def type(self) -> OperationType:
        return _TYPES[self]


_TYPES: Final = {
    Operation.CREATE: OperationType.CREATE,
    Operation.SEND: OperationType.SEND,
    Operation.PROCESS: OperationType.PROCESS,
    Operation.ACK: OperationType.SETTLE,
    Operation.NACK: OperationType.SETTLE,
    Operation.PUBLISH: OperationType.RECEIVE,
    Operation.DELIVER: OperationType.SEND,
}


def span_name(operation: Operation, destination: str | None = None) -> str:
    """``"{operation} {destination}"`` (e.g. ``"send payments.orders"``), or the operation alone
    when there is no single destination (a batch across topics)."""
    return f"{operation.value} {destination}" if destination else operation.value


def base_attributes(operation: Operation, destination: str | None = None) -> dict[str, str]:
    """The attributes every securebroker span starts with (sampling-relevant, so given at
    span start)."""
    attrs = {
        MESSAGING_SYSTEM: SYSTEM,
        MESSAGING_OPERATION_TYPE: operation.type.value,
        MESSAGING_OPERATION_NAME: operation.value,
    }
    if destination:
        attrs[MESSAGING_DESTINATION_NAME] = destination
    return attrs


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of an exception: a broker error's catalogue code (``stale_lease``),
    else the exception's fully qualified class name."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


__all__ = [
    "ERROR_TYPE",
    "MESSAGING_BATCH_MESSAGE_COUNT",
    "MESSAGING_CLIENT_ID",
    "MESSAGING_DESTINATION_NAME",
    "MESSAGING_DESTINATION_SUBSCRIPTION_NAME",
    "MESSAGING_MESSAGE_BODY_SIZE",
    "MESSAGING_MESSAGE_ID",
    "MESSAGING_OPERATION_NAME",
    "MESSAGING_OPERATION_TYPE",
    "MESSAGING_SYSTEM",
    "SECUREBROKER_ATTEMPT",
    "SECUREBROKER_DUPLICATE",
    "SECUREBROKER_FAILED_COUNT",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "SYSTEM",
    "Operation",
    "OperationType",
    "base_attributes",
    "error_type",
    "span_name",
]
