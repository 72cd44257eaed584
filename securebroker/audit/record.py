"""Audit records and the hash chain that makes them tamper-evident (DESIGN §4, ADR 0008).

A record is what happened (event, outcome), who did it (certificate identity and token subject),
from where (peer address and protocol), to what (topic, subscription, message id, key id), when,
and the trace it belongs to. Never a payload, a token or key material.

Records are written in *chains*: a chain is an append-only sequence numbered 1, 2, 3, ... that is
written by one writer at a time (one database transaction at a time; see ``chain.py``). Each
record carries the hash of its predecessor, and its own hash covers that and every field::

    hash(record) = SHA-256("sb-audit-v1" || prev_hash || canonical(record))

The first record of chain ``c`` has ``prev_hash = genesis(c)``. ``canonical`` is JSON of a list
in a fixed field order (times as integer microseconds since the epoch, ``detail`` with sorted
keys), so the offline verifier recomputes exactly the bytes the broker hashed from an export.

A *batch* record (format 2, ADR 0013) records one event for many messages at once: what one
actor did to one topic (and subscription) in one transaction, e.g. the "published" of a group
commit's messages from one connection. It carries ``message_ids`` and, aligned with them,
``trace_ids`` instead of ``message_id``/``trace_id``; both lists are hashed, so removing a message
from a batch breaks the record's hash like any other edit. Records of one message (format 1)
are hashed exactly as before, so chains written before batches verify unchanged.
"""

from __future__ import annotations

import enum
import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import msgspec

FORMAT: Final = 1
#: the canonical form of a batch record (one event for many messages)
BATCH_FORMAT: Final = 2
_DOMAIN: Final = b"sb-audit-v1"
_encode = msgspec.json.Encoder(order="sorted").encode
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

#: a scalar in a record's ``detail``: small facts, never payloads or secrets
Scalar = str | int | bool | None


class Event(enum.StrEnum):
    # the life of a message
    PUBLISHED = "published"
    DEDUPLICATED = "deduplicated"
    REJECTED = "rejected"
    DELIVERED = "delivered"
    ACKED = "acked"
    NACKED = "nacked"
    LEASE_EXPIRED = "lease_expired"
    DEAD_LETTERED = "dead_lettered"
    REDRIVEN = "redriven"
    PURGED = "purged"
    EXPIRED = "expired"
    # security
    AUTHENTICATION_FAILED = "authentication_failed"
    AUTHORIZATION_DENIED = "authorization_denied"
    POLICY_RELOADED = "policy_reloaded"
    # keys (encryption at rest)
    KEY_CREATED = "key_created"
    KEY_ROTATED = "key_rotated"
    KEY_REWRAPPED = "key_rewrapped"
    KEY_RETIRED = "key_retired"
    KEY_DESTROYED = "key_destroyed"
    # administration
    ADMIN = "admin"
    AUDIT_ACCESS = "audit_access"


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acted, and from where (PCI DSS 10.2.2: user identification and origination)."""

    #: the client certificate's identity (URI SAN or CN); "securebroker" for the broker itself
    certificate: str = ""
    #: the bearer token's ``sub``, when a token was presented
    subject: str | None = None
    #: peer address ("127.0.0.1:50122"), or the host name for local and internal actors
    address: str = ""
    #: "native", "http", "cli" or "internal"
    protocol: str = ""


BROKER = Actor(certificate="securebroker", protocol="internal")


#: the ``detail`` of events that have none (shared: never mutate it)
_NO_DETAIL: Mapping[str, Scalar] = {}


class AuditEvent(NamedTuple):
    """One thing to record, before it is placed in a chain. (A named tuple: one is built per
    message and lifecycle step on the hot path, and a frozen dataclass costs several times as
    much to construct.)"""

    at: datetime
    event: str
    actor: Actor
    outcome: str = Outcome.SUCCESS
    topic: str | None = None
    subscription: str | None = None
    message_id: str | None = None
    key_id: str | None = None
    trace_id: str | None = None
    detail: Mapping[str, Scalar] = _NO_DETAIL
    #: a batch record's messages (``message_id`` is then None), and their trace ids, aligned
    message_ids: Sequence[uuid.UUID | str] | None = None
    trace_ids: Sequence[str | None] | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A chained record, as stored and as exported (``to_json``/``from_json``)."""

    chain: int
    seq: int
    at_us: int
    event: str
    outcome: str
    actor_cert: str
    actor_sub: str | None
    origin_addr: str
    origin_proto: str
    topic: str | None
    subscription: str | None
    message_id: str | None
    key_id: str | None
    trace_id: str | None
    detail: Mapping[str, Scalar]
    prev_hash: bytes
    hash: bytes
    #: a batch record's messages and their trace ids (aligned); None on records of one message
    message_ids: tuple[str, ...] | None = None
    trace_ids: tuple[str | None, ...] | None = None

    @property
    def at(self) -> datetime:
        return from_us(self.at_us)

    def messages(self) -> tuple[str, ...]:
        """The ids of the messages this record is about (none, one, or a batch's)."""
        if self.message_ids is not None:
            return self.message_ids
        return () if self.message_id is None else (self.message_id,)

    def trace_of(self, message_id: str) -> str | None:
        """The trace id recorded for ``message_id`` (in a batch: at its position)."""
        if self.message_ids is None or self.trace_ids is None:
            return self.trace_id if message_id == self.message_id else None
        try:
            return self.trace_ids[self.message_ids.index(message_id)]
        except (ValueError, IndexError):
            return None

    def to_json(self) -> dict[str, Any]:
        out = {
            "chain": self.chain,
            "seq": self.seq,
            "at_us": self.at_us,
            "at": self.at.isoformat(),
            "event": self.event,
            "outcome": self.outcome,
            "actor_cert": self.actor_cert,
            "actor_sub": self.actor_sub,
            "origin_addr": self.origin_addr,
            "origin_proto": self.origin_proto,
            "topic": self.topic,
            "subscription": self.subscription,
            "message_id": self.message_id,
            "key_id": self.key_id,
            "trace_id": self.trace_id,
            "detail": dict(self.detail),
            "prev_hash": self.prev_hash.hex(),
            "hash": self.hash.hex(),
        }
        if self.message_ids is not None:  # format-1 records export exactly as before
            out["message_ids"] = list(self.message_ids)
            out["trace_ids"] = list(self.trace_ids or ())
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AuditRecord:
        """Parse an exported record; raises ``KeyError``/``TypeError``/``ValueError`` on bad
        input (the verifier reports those as a malformed record)."""
        return cls(
            chain=_int(d["chain"]),
            seq=_int(d["seq"]),
            at_us=_int(d["at_us"]),
            event=_str(d["event"]),
            outcome=_str(d["outcome"]),
            actor_cert=_str(d["actor_cert"]),
            actor_sub=_opt(d.get("actor_sub")),
            origin_addr=_str(d["origin_addr"]),
            origin_proto=_str(d["origin_proto"]),
            topic=_opt(d.get("topic")),
            subscription=_opt(d.get("subscription")),
            message_id=_opt(d.get("message_id")),
            key_id=_opt(d.get("key_id")),
            trace_id=_opt(d.get("trace_id")),
            detail=_detail(d.get("detail") or {}),
            prev_hash=bytes.fromhex(_str(d["prev_hash"])),
            hash=bytes.fromhex(_str(d["hash"])),
            message_ids=_ids(d.get("message_ids")),
            trace_ids=_traces(d.get("trace_ids"), d.get("message_ids")),
        )


def to_us(at: datetime) -> int:
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)


def genesis(chain: int) -> bytes:
    """The ``prev_hash`` of a chain's first record."""
    return hashlib.sha256(b"sb-audit-genesis" + chain.to_bytes(8, "big")).digest()


def canonical(
    chain: int,
    seq: int,
    at_us: int,
    event: str,
    outcome: str,
    actor_cert: str,
    actor_sub: str | None,
    origin_addr: str,
    origin_proto: str,
    topic: str | None,
    subscription: str | None,
    message_id: str | None,
    key_id: str | None,
    trace_id: str | None,
    detail: Mapping[str, Scalar] | msgspec.Raw,
    message_ids: Sequence[uuid.UUID | str] | None = None,
    trace_ids: Sequence[str | None] | None = None,
) -> bytes:
    """The hashed bytes. ``detail`` may be given already encoded (``msgspec.Raw`` of the same
    sorted-key JSON), so the writer encodes it once for both the hash and the column. A batch
    record (``message_ids`` given) appends its message and trace ids under format 2 (a UUID
    encodes as its canonical string, so the writer may pass UUIDs and the verifier strings)."""
    if message_ids is not None:
        return _encode(
            [
                BATCH_FORMAT, chain, seq, at_us, event, outcome, actor_cert, actor_sub,
                origin_addr, origin_proto, topic, subscription, message_id, key_id, trace_id,
                detail, message_ids, trace_ids,
            ]
        )  # fmt: skip
    return _encode(
        [
            FORMAT,
            chain,
            seq,
            at_us,
            event,
            outcome,
            actor_cert,
            actor_sub,
            origin_addr,
            origin_proto,
            topic,
            subscription,
            message_id,
            key_id,
            trace_id,
            detail,
        ]
    )


def chain_hash(prev_hash: bytes, body: bytes) -> bytes:
    return hashlib.sha256(_DOMAIN + prev_hash + body).digest()


def seal(chain: int, seq: int, prev_hash: bytes, ev: AuditEvent) -> AuditRecord:
    """Place ``ev`` at ``(chain, seq)`` after a record whose hash is ``prev_hash``."""
    at_us = to_us(ev.at)
    a = ev.actor
    detail = dict(ev.detail)
    ids = _strs(ev.message_ids)
    traces = None if ev.trace_ids is None else tuple(ev.trace_ids)
    body = canonical(
        chain,
        seq,
        at_us,
        ev.event,
        ev.outcome,
        a.certificate,
        a.subject,
        a.address,
        a.protocol,
        ev.topic,
        ev.subscription,
        ev.message_id,
        ev.key_id,
        ev.trace_id,
        detail,
        ids,
        traces,
    )
    return AuditRecord(
        chain=chain,
        seq=seq,
        at_us=at_us,
        event=ev.event,
        outcome=ev.outcome,
        actor_cert=a.certificate,
        actor_sub=a.subject,
        origin_addr=a.address,
        origin_proto=a.protocol,
        topic=ev.topic,
        subscription=ev.subscription,
        message_id=ev.message_id,
        key_id=ev.key_id,
        trace_id=ev.trace_id,
        detail=detail,
        prev_hash=prev_hash,
        hash=chain_hash(prev_hash, body),
        message_ids=ids,
        trace_ids=traces,
    )


def recompute(r: AuditRecord) -> bytes:
    """The hash ``r`` should carry, from its fields and its ``prev_hash``."""
    body = canonical(
        r.chain,
        r.seq,
        r.at_us,
        r.event,
        r.outcome,
        r.actor_cert,
        r.actor_sub,
        r.origin_addr,
        r.origin_proto,
        r.topic,
        r.subscription,
        r.message_id,
        r.key_id,
        r.trace_id,
        r.detail,
        r.message_ids,
        r.trace_ids,
    )
    return chain_hash(r.prev_hash, body)


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_id_of(trace_context: Mapping[str, str]) -> str | None:
    """The W3C trace id of a message's ``traceparent``, or None (absent, malformed, all-zero)."""
    tp = trace_context.get("traceparent")
    if not tp:
        return None
    m = _TRACEPARENT.fullmatch(tp.strip())
    if m is None or m.group(1) == "0" * 32:
        return None
    return m.group(1)


def _strs(ids: Sequence[uuid.UUID | str] | None) -> tuple[str, ...] | None:
    return None if ids is None else tuple(str(x) for x in ids)


def _ids(v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise TypeError("message_ids must be a list")
    return tuple(_str(x) for x in v)


def _traces(v: Any, ids: Any) -> tuple[str | None, ...] | None:
    if ids is None:
        if v is not None:
            raise TypeError("trace_ids without message_ids")
        return None
    if not isinstance(v, list) or len(v) != len(ids):
        raise TypeError("trace_ids must be a list aligned with message_ids")
    return tuple(_opt(x) for x in v)


def _int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError("expected an integer")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _opt(v: Any) -> str | None:
    return None if v is None else _str(v)


def _detail(v: Any) -> dict[str, Scalar]:
    if not isinstance(v, dict):
        raise TypeError("detail must be an object")
    out: dict[str, Scalar] = {}
    for k, x in v.items():
        if not isinstance(k, str) or not (x is None or isinstance(x, str | int | bool)):
            raise TypeError("detail values must be strings, integers, booleans or null")
        out[k] = x
    return out
