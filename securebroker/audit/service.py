"""The auditor operations, served by the broker to ``securebroker audit ...`` over mutual TLS.

They run as admin operations (``AdminService``), authorized as action ``audit`` on the resource
``securebroker.audit``, and every use is itself recorded (PCI DSS 10.2.1.3: access to audit
logs). Arguments come from the network and are checked here with clear errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from securebroker.audit.log import AuditLog
from securebroker.audit.record import Actor, AuditEvent, AuditRecord, Event, Scalar
from securebroker.errors import ValidationError
from securebroker.protocol.frames import FRAME_OVERHEAD, MAX_FRAME
from securebroker.server.admin import Handler

MAX_PAGE = 1000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TRAIL = 10_000
#: the bytes of records one reply may carry: a batch record (ADR 0013) lists up to a group's
#: messages, so a page is cut by size too, to fit one ADMIN_RESULT frame of a default client
PAGE_BYTES = MAX_FRAME - FRAME_OVERHEAD
_size = msgspec.msgpack.Encoder().encode


class AuditService:
    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def operations(self) -> Mapping[str, Handler]:
        return {
            "audit.trail": self._trail,
            "audit.search": self._search,
            "audit.export": self._export,
            "audit.checkpoints": self._checkpoints,
        }

    def _accessed(self, actor: Actor | None, operation: str, **detail: Scalar) -> None:
        self.log.record(
            [
                AuditEvent(
                    at=self.log.clock.now(),
                    event=Event.AUDIT_ACCESS,
                    actor=actor or Actor(certificate="unknown", protocol="internal"),
                    detail={"operation": operation, **detail},
                )
            ]
        )

    async def _trail(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        mid = _uuid(args, "message_id")
        records, cut = _fit(await self.log.trail(mid, MAX_TRAIL))
        self._accessed(actor, "audit.trail", message_id=str(mid))
        # a trail has no pages: one cut by size says so (search and export have the rest)
        return {"records": [r.to_json() for r in records], "truncated": cut}

    async def _search(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        since, until = _range(args)
        limit = _limit(args, 200)
        after = args.get("after")
        cursor: tuple[datetime, int, int] | None = None
        if after is not None:
            if not (isinstance(after, list) and len(after) == 3):
                raise ValidationError("argument 'after' must be [time, chain, seq]")
            cursor = (_time(after[0], "after"), _int(after[1], "after"), _int(after[2], "after"))
        filters = {k: _opt_str(args, k) for k in ("actor", "topic", "event")}
        records = await self.log.search(
            since,
            until,
            actor=filters["actor"],
            topic=filters["topic"],
            event=filters["event"],
            after=cursor,
            limit=limit,
        )
        records, cut = _fit(records)
        # every page is an access (a first page can be asked for with any cursor)
        self._accessed(
            actor,
            "audit.search",
            page=len(records),
            **{k: v[:256] for k, v in filters.items() if v},
        )
        nxt = None
        if len(records) == limit or cut:
            last = records[-1]
            nxt = [last.at.isoformat(), last.chain, last.seq]
        return {"records": [r.to_json() for r in records], "next": nxt}

    async def _export(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        since, until = await self._kept_range(args)
        limit = _limit(args, MAX_PAGE)
        after = args.get("after")
        cursor = (0, 0)
        if after is not None:
            if not (isinstance(after, list) and len(after) == 2):
                raise ValidationError("argument 'after' must be [chain, seq]")
            cursor = (_int(after[0], "after"), _int(after[1], "after"))
        records, cut = _fit(await self.log.export_page(since, until, cursor, limit))
        self._accessed(
            actor,
            "audit.export",
            since=since.isoformat(),
            until=until.isoformat(),
            page=len(records),
        )
        nxt = [records[-1].chain, records[-1].seq] if len(records) == limit or cut else None
        return {"records": [r.to_json() for r in records], "next": nxt}

    async def _kept_range(self, args: Mapping[str, Any]) -> tuple[datetime, datetime]:
        """``_range``, except that an export without ``since`` starts where the kept log starts
        (months dropped by retention are in earlier exports)."""
        since, until = _range(args)
        if not args.get("since"):
            horizon = await self.log.horizon()
            if horizon is not None and horizon < until:
                since = horizon
        return since, until

    async def _checkpoints(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        """The signed checkpoints of the range, after signing a fresh one for this process's
        chains, so an export made now is covered up to now (other broker processes' newest
        records are covered by their next periodic checkpoint)."""
        await self.log.checkpoint()
        if not args.get("until"):  # up to now: just after that checkpoint
            args = {**args, "until": (self.log.clock.now() + timedelta(microseconds=1)).isoformat()}
        since, until = await self._kept_range(args)
        cps = await self.log.checkpoints(since, until)
        keys = await self.log.public_keys()
        anchors = [] if since == EPOCH else await self.log.anchors(since, until)
        return {
            # the range actually covered, for the bundle header (None: from the beginning)
            "since": None if since == EPOCH else since.isoformat(),
            # where each chain continues from (its last record before the window)
            "anchors": [[c, s, h.hex()] for c, s, h in anchors],
            "until": until.isoformat(),
            "checkpoints": [c.to_json() for c in cps],
            "public_keys": [{"key_id": k, "public_key": pk.hex()} for k, pk in keys],
        }


def _fit(records: list[AuditRecord]) -> tuple[list[AuditRecord], bool]:
    """The first records of a page that fit in ``PAGE_BYTES`` (at least one), and whether the
    page was cut short (the reply then names where the next page starts)."""
    total = 0
    for i, r in enumerate(records):
        total += len(_size(r.to_json()))
        if total > PAGE_BYTES and i > 0:
            return records[:i], True
    return records, False


def _uuid(args: Mapping[str, Any], key: str) -> uuid.UUID:
    value = args.get(key)
    if not isinstance(value, str):
        raise ValidationError(f"argument {key!r} must be a message id (a UUID)")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationError(f"argument {key!r} must be a message id (a UUID)") from None


def _time(value: Any, key: str) -> datetime:
    if not isinstance(value, str):
        raise ValidationError(f"argument {key!r} must be an ISO 8601 time")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(f"argument {key!r} must be an ISO 8601 time") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _range(args: Mapping[str, Any]) -> tuple[datetime, datetime]:
    since = _time(args["since"], "since") if args.get("since") else EPOCH
    until = (
        _time(args["until"], "until")
        if args.get("until")
        else datetime.now(UTC) + timedelta(days=1)
    )
    if until <= since:
        raise ValidationError("'until' must be later than 'since'")
    return since, until


def _limit(args: Mapping[str, Any], default: int) -> int:
    value = args.get("limit", default)
    if type(value) is not int or not 1 <= value <= MAX_PAGE:
        raise ValidationError(f"argument 'limit' must be an integer from 1 to {MAX_PAGE}")
    return value


def _int(value: Any, key: str) -> int:
    if type(value) is not int or value < 0:
        raise ValidationError(f"argument {key!r} must hold non-negative integers")
    return value


def _opt_str(args: Mapping[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 1024:
        raise ValidationError(f"argument {key!r} must be a string of 1 to 1024 characters")
    return value
