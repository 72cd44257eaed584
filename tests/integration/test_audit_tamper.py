"""Tampering with the audit log in a real PostgreSQL is caught by the offline verifier.

Each test writes real traffic through the broker, has it sign checkpoints, tampers with
``sb_audit`` the way a database administrator could (``session_replication_role = replica``
switches off the append-only triggers, as a superuser can), exports a bundle with the real
``securebroker audit export`` and checks it with ``securebroker audit verify``, which needs no
database: the report must name the first bad sequence number. An untouched export verifies.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest
from native_fixtures import CLIENT, NativeHarness, make_queue
from test_audit_trail import cli_args, next_message, run_cli

from securebroker.audit.checkpoint import Checkpoint
from securebroker.audit.log import record_of
from securebroker.audit.record import recompute
from securebroker.core.model import PublishRequest

pytestmark = pytest.mark.asyncio


async def traffic(h: NativeHarness, n: int, topic: str = "payments.orders") -> None:
    """n publishes, each consumed and acked: published, delivered and acked records."""
    client = await h.connect(CLIENT)
    for i in range(n):
        h.clock.advance(0.01)
        await client.publish(topic, f"payment {i}".encode())
    sub = client.consume("ledger", credit=10)
    for _ in range(n):
        msg = await next_message(sub)
        await msg.ack()
    await sub.close()


async def busiest_chain(h: NativeHarness) -> tuple[int, int]:
    async with h.store.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT chain, max(seq) AS head FROM sb_audit GROUP BY chain ORDER BY count(*) DESC "
            "LIMIT 1"
        )
    assert row is not None
    return row["chain"], row["head"]


async def signed(h: NativeHarness) -> Checkpoint:
    assert h.audit is not None
    cp = await h.audit.checkpoint()
    assert cp is not None
    return cp


async def tamper(dsn: str, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Run SQL as a superuser with the append-only triggers switched off."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            for sql, args in statements:
                await conn.execute(sql, *args)
    finally:
        await conn.close()


async def export_and_verify(
    h: NativeHarness, tmp_path: Path, *export_args: str
) -> tuple[int, dict[str, object]]:
    bundle = tmp_path / "audit.jsonl.gz"
    exported = await run_cli("audit", "export", "-o", str(bundle), *export_args, *cli_args(h))
    assert exported.exit_code == 0, exported.output
    # offline: no broker, no database; the auditor pins the signing key they were given
    assert h.audit is not None and h.audit.signer is not None
    pinned = h.audit.signer.public_bytes().hex()
    return await asyncio.to_thread(_verify, str(bundle), "--public-key", pinned, "--json")


def _verify(*args: str) -> tuple[int, dict[str, object]]:
    from click.testing import CliRunner  # noqa: PLC0415

    from securebroker.cli import main  # noqa: PLC0415

    result = CliRunner().invoke(main, ["audit", "verify", *args])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.output)


def first_problem(report: dict[str, object]) -> tuple[str, int | None, int | None]:
    problems = report["problems"]
    assert isinstance(problems, list) and problems, report
    p = problems[0]
    return p["kind"], p["chain"], p["seq"]


@dataclass
class Logged:
    h: NativeHarness
    chain: int
    head: int
    dsn: str
    checkpoint: Checkpoint


@pytest.fixture
async def logged(native: NativeHarness, pg_dsn: str) -> Logged:
    """A broker whose log has real traffic and a signed checkpoint over all of it."""
    await make_queue(native, "payments.orders", "ledger")
    await traffic(native, 12)
    chain, head = await busiest_chain(native)
    cp = await signed(native)
    assert cp.head(chain) is not None and cp.head(chain).seq == head  # type: ignore[union-attr]
    assert head >= 10
    return Logged(native, chain, head, pg_dsn, cp)


async def test_untouched_export_verifies(logged: Logged, tmp_path: Path) -> None:
    h = logged.h
    code, report = await export_and_verify(h, tmp_path)
    assert code == 0, report
    assert report["problems"] == []


async def test_edited_field_is_reported_at_its_sequence_number(
    logged: Logged, tmp_path: Path
) -> None:
    h, chain = logged.h, logged.chain
    await tamper(
        logged.dsn,
        ("UPDATE sb_audit SET actor_cert = 'mallory' WHERE chain = $1 AND seq = 5", (chain,)),
    )
    code, report = await export_and_verify(h, tmp_path)
    assert code == 1
    assert first_problem(report) == ("altered", chain, 5)


async def test_deleted_middle_record_is_reported(logged: Logged, tmp_path: Path) -> None:
    h, chain = logged.h, logged.chain
    await tamper(logged.dsn, ("DELETE FROM sb_audit WHERE chain = $1 AND seq = 6", (chain,)))
    code, report = await export_and_verify(h, tmp_path)
    assert code == 1
    assert first_problem(report) == ("missing", chain, 6)


async def test_reordered_records_are_reported(logged: Logged, tmp_path: Path) -> None:
    h, chain = logged.h, logged.chain
    await tamper(
        logged.dsn,
        (
            "UPDATE sb_audit SET seq = CASE seq WHEN 4 THEN 5 ELSE 4 END "
            "WHERE chain = $1 AND seq IN (4, 5)",
            (chain,),
        ),
    )
    code, report = await export_and_verify(h, tmp_path)
    assert code == 1
    kind, c, seq = first_problem(report)
    assert (c, seq) == (chain, 4) and kind in ("altered", "broken_link")


async def test_deleting_the_newest_records_is_caught_by_the_checkpoint(
    logged: Logged, tmp_path: Path
) -> None:
    h, chain, head = logged.h, logged.chain, logged.head
    await tamper(
        logged.dsn, ("DELETE FROM sb_audit WHERE chain = $1 AND seq > $2", (chain, head - 3))
    )
    code, report = await export_and_verify(h, tmp_path)
    assert code == 1
    assert first_problem(report) == ("truncated", chain, head - 2)


async def test_a_rehashed_forgery_without_the_signing_key_is_caught(
    logged: Logged, tmp_path: Path
) -> None:
    h, first = logged.h, logged.checkpoint
    await traffic(h, 6)  # more records after the first checkpoint, then a second one
    second = await signed(h)
    # a chain that both checkpoints cover and that grew in between
    grown = [
        (c.chain, c.seq)
        for c in first.heads
        if (later := second.head(c.chain)) is not None and later.seq > c.seq
    ]
    assert grown, (first.heads, second.heads)
    chain, first_head = grown[0]
    # Rewrite everything after the first checkpoint with valid links: only the signatures
    # (made with a key the forger does not have) can tell.
    async with h.store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM sb_audit WHERE chain = $1 AND seq >= $2 ORDER BY seq",
            chain,
            first_head,
        )
    records = [record_of(r) for r in rows]
    prev = records[0].hash
    updates = []
    for r in records[1:]:
        forged = replace(r, actor_cert="mallory", prev_hash=prev, hash=b"")
        forged = replace(forged, hash=recompute(forged))
        prev = forged.hash
        updates.append(
            (
                "UPDATE sb_audit SET actor_cert = $3, prev_hash = $4, hash = $5 "
                "WHERE chain = $1 AND seq = $2",
                (chain, r.seq, forged.actor_cert, forged.prev_hash, forged.hash),
            )
        )
    await tamper(logged.dsn, *updates)
    code, report = await export_and_verify(h, tmp_path)
    assert code == 1
    assert first_problem(report) == ("checkpoint_mismatch", chain, first_head + 1)


async def test_a_window_that_lost_its_first_records_is_caught(
    logged: Logged, tmp_path: Path
) -> None:
    """An export from a time on (``--since``) starts mid-chain; the record before the window
    anchors it, so deleting the window's first records is caught, not just warned about."""
    h = logged.h
    h.clock.advance(3600)
    since = h.clock.now()
    h.clock.advance(1)
    await traffic(h, 6)
    await signed(h)
    async with h.store.pool.acquire() as conn:
        row = await conn.fetchrow(
            # a chain that goes on after the two deleted records (else the cut is "truncated")
            "SELECT chain, min(seq) AS first FROM sb_audit WHERE at >= $1 AND chain IN "
            "(SELECT chain FROM sb_audit WHERE at < $1) GROUP BY chain HAVING count(*) > 2 "
            "ORDER BY 1 LIMIT 1",
            since,
        )
    assert row is not None
    chain, first = row["chain"], row["first"]
    clean = tmp_path / "clean"
    clean.mkdir()
    code, report = await export_and_verify(h, clean, "--since", since.isoformat())
    assert code == 0, report
    assert not any("mid-chain" in w for w in report["warnings"])  # type: ignore[union-attr]
    await tamper(
        logged.dsn,
        (
            "DELETE FROM sb_audit WHERE chain = $1 AND seq IN ($2::bigint, $2::bigint + 1)",
            (chain, first),
        ),
    )
    cut = tmp_path / "cut"
    cut.mkdir()
    code, report = await export_and_verify(h, cut, "--since", since.isoformat())
    assert code == 1, (chain, first, report)
    assert first_problem(report) == ("missing", chain, first)


async def test_an_export_of_batch_records_fits_the_protocols_frames(
    native: NativeHarness, tmp_path: Path
) -> None:
    """Batch records (ADR 0013) list up to a group's messages each: an export page of them
    must still fit in one ADMIN_RESULT frame, or ``audit export`` cannot export the log."""
    h = native
    await make_queue(h, "payments.orders", "ledger")
    tp = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    for _ in range(20):  # 20 "published" records of 1,000 messages each
        h.clock.advance(0.01)
        await h.broker.publish_batch(
            [PublishRequest("payments.orders", b"x", trace_context=tp) for _ in range(1000)]
        )
    await signed(h)
    code, report = await export_and_verify(h, tmp_path)
    assert code == 0, report
    assert report["records"] >= 20
