"""The error catalogue: one root error with stable codes, mapped once to each protocol.

Every error the broker reports has a stable string ``code`` (what clients branch on) and a
numeric ``wire`` code (what the native protocol carries). Messages are written for humans and
never contain payloads, keys or tokens. Crypto and authentication failures are deliberately
opaque on the wire; the specific reason goes to the audit log, not to the peer.
"""

from __future__ import annotations

from typing import ClassVar


class BrokerError(Exception):
    """Root of every error securebroker raises on purpose."""

    code: ClassVar[str] = "error"
    wire: ClassVar[int] = 0
    #: True when a client may retry the same request unchanged (after reconnecting).
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: the specific reason, for logs and the audit trail only; never sent to the peer
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class InternalError(BrokerError):
    code = "internal"
    wire = 1
    retryable = True


class ConfigError(BrokerError, ValueError):
    """A configuration value is missing or invalid; the message names the key."""

    code = "config"
    wire = 2


class ValidationError(BrokerError, ValueError):
    """A request is well-formed on the wire but its content is not acceptable."""

    code = "invalid_request"
    wire = 10


class NotFoundError(BrokerError, LookupError):
    code = "not_found"
    wire = 20


class TopicNotFound(NotFoundError):
    code = "topic_not_found"
    wire = 21


class SubscriptionNotFound(NotFoundError):
    code = "subscription_not_found"
    wire = 22


class MessageNotFound(NotFoundError):
    code = "message_not_found"
    wire = 23


class AlreadyExists(BrokerError):
    code = "already_exists"
    wire = 30


class IdempotencyConflict(BrokerError):
    """The idempotency key was used before with a different message."""

    code = "idempotency_conflict"
    wire = 31


class StaleLease(BrokerError):
    """The lease token no longer owns the delivery (it expired and moved on, or was settled)."""

    code = "stale_lease"
    wire = 32


class NotEmpty(BrokerError):
    code = "not_empty"
    wire = 33


class ProtocolError(BrokerError):
    """Malformed or out-of-limit input on the wire; the connection is closed after reporting it."""

    code = "protocol_error"
    wire = 40


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"
    wire = 41


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"
    wire = 42


class FlowControlError(ProtocolError):
    code = "flow_control"
    wire = 43


class AuthenticationError(BrokerError):
    """Opaque on the wire: the specific reason is audited, never sent to the peer."""

    code = "unauthenticated"
    wire = 50


class AuthorizationError(BrokerError):
    code = "forbidden"
    wire = 51


class TokenExpired(AuthenticationError):
    code = "token_expired"
    wire = 52


class Unavailable(BrokerError):
    """The broker cannot serve the request right now (shutting down, database unreachable)."""

    code = "unavailable"
    wire = 60
    retryable = True


class ResourceExhausted(BrokerError):
    code = "resource_exhausted"
    wire = 61
    retryable = True


def _catalogue() -> dict[int, type[BrokerError]]:
    out: dict[int, type[BrokerError]] = {}
    stack: list[type[BrokerError]] = [BrokerError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "wire" not in cls.__dict__:
            continue  # a refinement that shares its parent's wire code (e.g. PolicyError)
        if cls.wire in out and out[cls.wire] is not cls:
            raise AssertionError(f"duplicate wire code {cls.wire}: {cls} and {out[cls.wire]}")
        out[cls.wire] = cls
    return out


#: wire code -> error class, so clients can re-raise the server's error as the same type.
BY_WIRE: dict[int, type[BrokerError]] = _catalogue()


def from_wire(wire: int, message: str) -> BrokerError:
    """Rebuild an error from its wire code; unknown codes become a generic ``BrokerError``."""
    cls = BY_WIRE.get(wire, BrokerError)
    return cls(message)
