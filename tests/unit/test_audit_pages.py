"""Auditor replies are cut by size as well as by count: a batch record (ADR 0013) lists up to a
group's messages, and a reply must fit one ADMIN_RESULT frame of a default client."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from securebroker.audit.record import Actor, AuditEvent, AuditRecord, Event, genesis, seal
from securebroker.audit.service import PAGE_BYTES, _fit

T0 = datetime(2026, 11, 26, tzinfo=UTC)
ACTOR = Actor("spiffe://x/y", "svc", "127.0.0.1:1", "native")


def batch(seq: int, n: int) -> AuditRecord:
    ids = [f"00000000-0000-0000-0000-{seq:06d}{j:06d}" for j in range(n)]
    return seal(1, seq, genesis(1), AuditEvent(T0, Event.DELIVERED, ACTOR, message_ids=ids,
                                                trace_ids=["ab" * 16] * n))  # fmt: skip


def test_a_page_of_large_batch_records_is_cut_to_fit_one_frame() -> None:
    records = [batch(i, 1000) for i in range(1, 31)]
    page, cut = _fit(records)
    assert cut and 0 < len(page) < len(records)
    assert page == records[: len(page)]  # the first ones, in order: the next page follows
    size = sum(len(msgspec.msgpack.encode(r.to_json())) for r in page)
    assert size <= PAGE_BYTES


def test_small_pages_are_not_cut_and_one_huge_record_still_goes_out() -> None:
    small = [batch(i, 1) for i in range(1, 201)]
    assert _fit(small) == (small, False)
    huge = [batch(1, 20_000), batch(2, 1)]
    page, cut = _fit(huge)
    assert page == huge[:1] and cut  # never an empty page (the cursor must move)
