"""Retention: a month of the audit log is dropped whole, and only when a verified export holds
exactly its records (docs/operations.md, "Audit retention")."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from native_fixtures import NativeHarness, make_queue
from test_audit_tamper import export_and_verify, signed, traffic

from securebroker.audit.retention import add_months, month_start, prune
from securebroker.errors import ValidationError

pytestmark = pytest.mark.asyncio


def this_month(h: NativeHarness) -> date:
    """The month the harness clock is in: where the test's records are."""
    return h.clock.now().date().replace(day=1)


def later(month: date) -> datetime:
    """A "now" that makes ``month`` old enough to prune (14 months on)."""
    return month_start(add_months(month, 14))


async def records_of(h: NativeHarness, m: date) -> int:
    """Records of month ``m`` in the database."""
    async with h.store.pool.acquire() as conn:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM sb_audit WHERE at >= $1 AND at < $2",
            month_start(m),
            month_start(add_months(m, 1)),
        )
    return n


async def exported(h: NativeHarness, tmp_path: Path) -> tuple[Path, date]:
    """Traffic in this month, then (two months on, so the month is complete: the export's own
    access record lands later) a verified export. Returns the bundle and the month."""
    month = this_month(h)
    await make_queue(h, "payments.orders", "ledger")
    await traffic(h, 5)
    await signed(h)
    h.clock.advance(timedelta(days=62))
    code, report = await export_and_verify(h, tmp_path)
    assert code == 0, report
    return tmp_path / "audit.jsonl.gz", month


async def test_a_verified_export_lets_its_month_be_dropped(
    native: NativeHarness, tmp_path: Path
) -> None:
    bundle, month = await exported(native, tmp_path)
    kept = await records_of(native, month)
    assert native.audit is not None and native.audit.signer is not None
    done = await prune(
        native.audit,
        before=add_months(month, 1),
        bundle_path=bundle,
        trusted_key=native.audit.signer.public_bytes(),
        now=later(month),
    )
    assert [(p.month, p.records) for p in done] == [(month, kept)]
    assert await records_of(native, month) == 0
    async with native.store.pool.acquire() as conn:
        pruned = await conn.fetchrow("SELECT month, records FROM sb_audit_pruned")
        event = await conn.fetchrow(
            "SELECT detail::jsonb AS detail FROM sb_audit WHERE event = 'admin' "
            "AND detail::jsonb->>'operation' = 'audit.prune'"
        )
    assert pruned is not None and pruned["records"] == kept
    assert event is not None and event["detail"]["month"] == f"{month:%Y-%m}"
    # what is kept still verifies: exports now start where the kept log starts (the test's
    # "now" is 14 months on, so the export runs up to then)
    again = tmp_path / "after"
    again.mkdir()
    until = (later(month) + timedelta(days=1)).isoformat()
    code, report = await export_and_verify(native, again, "--until", until)
    assert code == 0, report


async def test_an_incomplete_export_prunes_nothing(native: NativeHarness, tmp_path: Path) -> None:
    bundle, month = await exported(native, tmp_path)
    assert native.audit is not None and native.audit.signer is not None
    native.clock.advance(timedelta(days=-62))  # back in that month: records it does not hold
    # on new chains: time never goes back within a chain, so a chain that already recorded the
    # export (two months on) would stamp these records with its later time
    native.audit.connection_lost()
    held = await records_of(native, month)
    await traffic(native, 2)
    before = await records_of(native, month)
    assert before > held  # the month now has records the export does not hold
    with pytest.raises(ValidationError, match="export that month again; nothing was pruned"):
        await prune(
            native.audit,
            before=add_months(month, 1),
            bundle_path=bundle,
            trusted_key=native.audit.signer.public_bytes(),
            now=later(month),
        )
    assert await records_of(native, month) == before


async def test_a_month_inside_the_retention_period_is_kept(
    native: NativeHarness, tmp_path: Path
) -> None:
    bundle, month = await exported(native, tmp_path)
    assert native.audit is not None and native.audit.signer is not None
    with pytest.raises(ValidationError, match="within the 12-month retention period"):
        await prune(
            native.audit,
            before=add_months(month, 1),
            bundle_path=bundle,
            trusted_key=native.audit.signer.public_bytes(),
            now=month_start(add_months(month, 5)),
        )
    assert await records_of(native, month) > 0


async def test_an_export_signed_by_another_key_prunes_nothing(
    native: NativeHarness, tmp_path: Path
) -> None:
    from securebroker.audit.checkpoint import SigningKey  # noqa: PLC0415

    bundle, month = await exported(native, tmp_path)
    assert native.audit is not None
    with pytest.raises(ValidationError, match="does not verify"):
        await prune(
            native.audit,
            before=add_months(month, 1),
            bundle_path=bundle,
            trusted_key=SigningKey.generate().public_bytes(),
            now=later(month),
        )
    assert await records_of(native, month) > 0
