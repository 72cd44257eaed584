"""Retention: old months of the audit log are exported, verified, and dropped whole.

PCI DSS 10.5.1 asks for twelve months of audit history with the latest three immediately
available. ``sb_audit`` is partitioned by month; ``prune`` drops a month's partition only when

- the month is older than the retention period (default twelve months), and
- an export bundle verifies offline (``verify_bundle``, against a pinned public key) and holds
  exactly the records the database has for that month (same count, same hashes in chain order).

Each dropped month is remembered in ``sb_audit_pruned`` with the bundle's SHA-256, and the prune
itself is an audit record, so the trail says where the older history went.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from securebroker.audit import events as ae
from securebroker.audit.bundle import Bundle, read_bundle
from securebroker.audit.log import AuditLog, Q
from securebroker.audit.record import Actor, to_us
from securebroker.audit.verify import Report, verify_bundle
from securebroker.errors import ValidationError


@dataclass(frozen=True)
class PrunedMonth:
    month: date
    records: int


def add_months(d: date, months: int) -> date:
    total = d.year * 12 + (d.month - 1) + months
    return date(total // 12, total % 12 + 1, 1)


def month_start(d: date) -> datetime:
    return datetime(d.year, d.month, 1, tzinfo=UTC)


def _load(path: Path, trusted_key: bytes) -> tuple[Bundle, Report, str]:
    bundle = read_bundle(path)
    return (
        bundle,
        verify_bundle(bundle, [trusted_key]),
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def _bundle_digest(records: list[Any], lo: datetime, hi: datetime) -> tuple[int, bytes]:
    lo_us, hi_us = to_us(lo), to_us(hi)
    chosen = sorted(
        (r for r in records if lo_us <= r.at_us < hi_us), key=lambda r: (r.chain, r.seq)
    )
    return len(chosen), hashlib.sha256(b"".join(r.hash for r in chosen)).digest()


async def prune(
    audit: AuditLog,
    *,
    before: date,
    bundle_path: Path,
    trusted_key: bytes,
    now: datetime,
    min_age_months: int = 12,
    actor: Actor | None = None,
) -> list[PrunedMonth]:
    """Drop every monthly partition before ``before`` that the verified bundle holds."""
    pool = audit.pool
    months = [r["month"] for r in await pool.fetch(Q["audit_partitions"])]
    doomed = [m for m in months if m < before]
    if not doomed:
        raise ValidationError(f"no audit months before {before:%Y-%m} to prune")
    youngest_allowed = add_months(now.date().replace(day=1), -min_age_months)
    too_young = [m for m in doomed if m >= youngest_allowed]
    if too_young:
        raise ValidationError(
            f"{too_young[0]:%Y-%m} is within the {min_age_months}-month retention period; "
            "nothing was pruned"
        )
    bundle, report, bundle_sha = await asyncio.to_thread(_load, bundle_path, trusted_key)
    if not report.ok:
        first = report.first_problem
        raise ValidationError(
            f"the bundle does not verify ({first.where if first else '?'}: "
            f"{first.message if first else 'unknown'}); nothing was pruned"
        )
    plan: list[PrunedMonth] = []
    # One transaction: lock each month against writers, check it against the bundle, drop it.
    async with audit.transaction() as (conn, events):
        for m in doomed:
            lo, hi = month_start(m), month_start(add_months(m, 1))
            await conn.fetchval(Q["audit_lock_partition"], m)
            row = await conn.fetchrow(Q["audit_digest_between"], lo, hi)
            assert row is not None
            n, digest = _bundle_digest(bundle.records, lo, hi)
            if n != row["n"] or digest != bytes(row["digest"]):
                raise ValidationError(
                    f"the bundle holds {n} records of {m:%Y-%m} but the database holds "
                    f"{row['n']} (or different ones): export that month again; "
                    "nothing was pruned"
                )
            plan.append(PrunedMonth(m, n))
        for p in plan:
            await conn.fetchval(Q["audit_drop_partition"], p.month)
            await conn.execute(Q["audit_pruned_insert"], p.month, p.records, bundle_sha)
            events.append(
                ae.admin(
                    now,
                    actor,
                    "audit.prune",
                    detail={
                        "month": f"{p.month:%Y-%m}",
                        "records": p.records,
                        "bundle_sha256": bundle_sha,
                    },
                )
            )
    return plan
