"""Builders of audit events, shared by every store adapter and front door so the same change is
recorded the same way wherever it happens. Builders take ids and names, never payloads."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from securebroker.audit.record import (
    _NO_DETAIL,
    BROKER,
    Actor,
    AuditEvent,
    Event,
    Outcome,
    Scalar,
    trace_id_of,
)

#: what a store method records with when its caller names no actor (embedding, tests)
UNKNOWN = Actor(certificate="unknown", protocol="internal")


def message_event(
    event: Event,
    at: datetime,
    actor: Actor | None,
    topic: str | None,
    message_id: uuid.UUID | str,
    *,
    subscription: str | None = None,
    trace_context: Mapping[str, str] | None = None,
    outcome: Outcome = Outcome.SUCCESS,
    detail: Mapping[str, Scalar] | None = None,
) -> AuditEvent:
    return AuditEvent(
        at,
        event,
        actor or UNKNOWN,
        outcome,
        topic,
        subscription,
        str(message_id),
        None,
        trace_id_of(trace_context) if trace_context else None,
        detail or _NO_DETAIL,
    )


def batch(
    event: Event,
    at: datetime,
    actor: Actor | None,
    topic: str | None,
    message_ids: Sequence[uuid.UUID | str],
    trace_ids: Sequence[str | None],
    *,
    subscription: str | None = None,
    detail: Mapping[str, Scalar] | None = None,
) -> AuditEvent:
    """One record of ``event`` for many messages: what one actor did to them, on one topic
    (and subscription), in one transaction (ADR 0013). ``trace_ids`` is aligned with
    ``message_ids``."""
    return AuditEvent(
        at,
        event,
        actor or UNKNOWN,
        Outcome.SUCCESS,
        topic,
        subscription,
        None,
        None,
        None,
        detail or _NO_DETAIL,
        message_ids,
        trace_ids,
    )


def trace_ids(contexts: Iterable[Mapping[str, str] | None]) -> list[str | None]:
    """The trace ids of messages with these trace contexts (None where there is none)."""
    return [trace_id_of(c) if c else None for c in contexts]


def admin(
    at: datetime,
    actor: Actor | None,
    operation: str,
    *,
    topic: str | None = None,
    subscription: str | None = None,
    detail: Mapping[str, Scalar] | None = None,
    outcome: Outcome = Outcome.SUCCESS,
) -> AuditEvent:
    return AuditEvent(
        at=at,
        event=Event.ADMIN,
        actor=actor or UNKNOWN,
        outcome=outcome,
        topic=topic,
        subscription=subscription,
        detail={"operation": operation, **(detail or {})},
    )


def security(
    event: Event,
    at: datetime,
    actor: Actor,
    reason: str,
    *,
    topic: str | None = None,
    subscription: str | None = None,
    action: str | None = None,
) -> AuditEvent:
    """A failed authentication or a denied authorization, with its specific reason (which the
    peer never sees)."""
    detail: dict[str, Scalar] = {"reason": clean(reason, 512)}
    if action is not None:
        detail["action"] = clean(action, 64)
    return AuditEvent(
        at=at,
        event=event,
        actor=actor,
        outcome=Outcome.FAILURE,
        topic=None if topic is None else clean(topic, 255),
        subscription=None if subscription is None else clean(subscription, 255),
        detail=detail,
    )


def clean(text: str, limit: int) -> str:
    """Text from a refused request, made safe to store: bounded, and without the NUL
    character (which PostgreSQL text cannot hold: one such name must not block the writer)."""
    text = text[:limit]
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def key_event(
    event: Event,
    at: datetime,
    actor: Actor,
    key_id: str,
    detail: Mapping[str, Scalar] | None = None,
) -> AuditEvent:
    return AuditEvent(at=at, event=event, actor=actor, key_id=key_id, detail=detail or {})


def suppressed(at: datetime, count: int) -> AuditEvent:
    """How many queued security events could not be kept (a flood beyond the queue bound)."""
    return AuditEvent(
        at=at,
        event="audit_suppressed",
        actor=BROKER,
        outcome=Outcome.FAILURE,
        detail={"count": count},
    )
