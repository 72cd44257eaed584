"""The audit writer's lanes: the hot-path staging is held to the reference ``record.seal``, and
a lane's head moves only when its transaction committed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from securebroker.audit import events as ae
from securebroker.audit.log import COLUMNS, AuditLog, Lane
from securebroker.audit.record import Actor, AuditRecord, Event, genesis, recompute, seal, to_us

ACTOR = Actor(certificate="spiffe://x/y", subject="svc", address="127.0.0.1:1", protocol="native")
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def events(n: int) -> list[Any]:
    out = []
    for i in range(n):
        at = T0 + timedelta(microseconds=i // 3)  # some share a time, some do not
        if i % 3 == 0:
            out.append(
                ae.message_event(
                    Event.PUBLISHED,
                    at,
                    ACTOR,
                    "t",
                    uuid.uuid4(),
                    trace_context={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"},
                )
            )
        elif i % 3 == 1:
            out.append(
                ae.message_event(
                    Event.DELIVERED, at, ACTOR, "t", uuid.uuid4(), subscription="s",
                    detail={"attempt": i, "consumer": None},
                )
            )  # fmt: skip
        else:
            out.append(ae.security(Event.AUTHORIZATION_DENIED, at, ACTOR, "no rule", action="x"))
        if i % 5 == 4:  # a batch record (ADR 0013), with UUIDs as the writer passes them
            ids = [uuid.uuid4() for _ in range(i % 7 + 1)]
            traces = [None if j % 2 else "ab" * 16 for j in range(len(ids))]
            out.append(ae.batch(Event.ACKED, at, ACTOR, "t", ids, traces, subscription="s"))
    return out


def as_record(row: tuple[Any, ...]) -> AuditRecord:
    d = dict(zip(COLUMNS, row, strict=True))
    import json  # noqa: PLC0415

    return AuditRecord(
        chain=d["chain"],
        seq=d["seq"],
        at_us=to_us(d["at"]),
        event=d["event"],
        outcome=d["outcome"],
        actor_cert=d["actor_cert"],
        actor_sub=d["actor_sub"],
        origin_addr=d["origin_addr"],
        origin_proto=d["origin_proto"],
        topic=d["topic"],
        subscription=d["subscription"],
        message_id=d["message_id"],
        key_id=d["key_id"],
        trace_id=d["trace_id"],
        detail=json.loads(d["detail"]) if d["detail"] else {},
        prev_hash=d["prev_hash"],
        hash=d["hash"],
        # as read back from the table (record_of): uuid[] and text[] columns
        message_ids=None if d["message_ids"] is None else tuple(str(x) for x in d["message_ids"]),
        trace_ids=None if d["trace_ids"] is None else tuple(d["trace_ids"]),
    )


def test_staged_rows_hash_exactly_as_the_reference_seal() -> None:
    evs = events(30)
    lane = Lane(7, 0, genesis(7), 0)
    rows = lane.stage(evs)
    prev = genesis(7)
    for i, (ev, row) in enumerate(zip(evs, rows, strict=True)):
        ref = seal(7, i + 1, prev, ev)
        assert row[COLUMNS.index("hash")] == ref.hash
        assert row[COLUMNS.index("prev_hash")] == prev
        # and what is stored recomputes to the stored hash (what `audit verify` does)
        assert recompute(as_record(row)) == ref.hash
        prev = ref.hash
    assert sum(r[COLUMNS.index("message_ids")] is not None for r in rows) == 6


def test_the_head_moves_only_after_a_commit() -> None:
    log = AuditLog(pool=None, signer=None)  # type: ignore[arg-type]
    lane = Lane(1, 0, genesis(1), 0)
    staged = lane.stage(events(3))
    log.checkin(lane, staged, "rolled_back")
    assert (lane.seq, lane.head) == (0, genesis(1))
    staged = lane.stage(events(3))
    log.checkin(lane, staged, "committed")
    assert (lane.seq, lane.head) == (3, staged[-1][COLUMNS.index("hash")])
    assert lane.head_at_us == to_us(staged[-1][COLUMNS.index("at")])
    # an unknown COMMIT outcome retires the lane: it is not handed out again
    log._lanes[1] = lane
    log._free.clear()  # as if checked out for that transaction
    log.checkin(lane, lane.stage(events(2)), "unknown")
    assert lane.suspect and lane not in log._free
    assert log.heads() == []  # not signed until its head is read back


def test_time_never_goes_back_within_a_chain() -> None:
    """A queued event stamped before the last record is written with the last record's time:
    export windows cut chains by time, so a chain is ordered by it."""
    lane = Lane(3, 0, genesis(3), 0)
    first = lane.stage(events(3))
    lane.advance(first)
    late = ae.security(Event.AUTHENTICATION_FAILED, T0 - timedelta(seconds=5), ACTOR, "stale")
    [row] = lane.stage([late])
    at = COLUMNS.index("at")
    assert row[at] == first[-1][at]  # moved up to the head's time, not before it
    rec = as_record(row)
    assert recompute(rec) == rec.hash  # and hashed with the time it is stored with


def test_a_lost_connection_retires_every_lane() -> None:
    log = AuditLog(pool=None, signer=None)  # type: ignore[arg-type]
    lanes = [Lane(c, 2, genesis(c), 0) for c in (1, 2)]
    for lane in lanes:
        log._lanes[lane.chain] = lane
    log._free.append(lanes[0])
    log._busy.add(2)  # lane 2 is in a transaction right now
    log.connection_lost()
    assert log._free == [] and all(x.retired and x.suspect for x in lanes)
    log.checkin(lanes[1], lanes[1].stage(events(1)), "committed")
    assert lanes[1].seq == 2  # a retired lane does not move, and is not handed out again
    assert log._free == []


def test_security_events_store_safe_text() -> None:
    ev = ae.security(Event.AUTHORIZATION_DENIED, T0, ACTOR, "r" * 5000, topic="a\x00b" * 200)
    assert ev.topic is not None and "\x00" not in ev.topic and len(ev.topic) <= 255
    assert len(str(ev.detail["reason"])) == 512
