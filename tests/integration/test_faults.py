"""The payment flow under the fault harness: every confirmed order takes effect exactly once.

One harness run (module-scoped, under a minute on two cores) drives the flow of
``securebroker/faults/flow.py`` through real processes: the broker (``securebroker serve``,
mutual TLS, bound JWTs, encryption at rest, audit on), an embedded PostgreSQL, an outbox relay,
a payment service and a ledger consumer. It SIGKILLs the broker at 20 seeded points under load,
restarts PostgreSQL twice under load, and SIGKILLs the relay four times and the payment service
and the ledger consumer four and two times mid-batch; then it drains and accounts for every
order (``securebroker/faults/checker.py``).

The tests then read the result, and check the checker on the run's real data: with one
ledger debit deleted it must report a loss, with one completion copied a double effect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio

from securebroker.faults.checker import check
from securebroker.faults.flow import COMPLETION_STAGE, DEBIT_STAGE
from securebroker.faults.harness import (
    BROKER_KILL,
    LEDGER_KILL,
    PAYMENT_KILL,
    POSTGRES_RESTART,
    RELAY_KILL,
    FaultHarness,
    HarnessReport,
    HarnessSettings,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

SETTINGS = HarnessSettings(
    seed=20261125,
    cycles=20,
    postgres_restarts=2,
    relay_kills=4,
    payment_kills=4,
    ledger_kills=2,
    order_rate=100.0,
    # bounds for a hang, never waited out when things work: the run takes under a minute here
    max_seconds=480.0,
    step_timeout=90.0,
    drain_timeout=120.0,
)


@dataclass
class Run:
    harness: FaultHarness
    report: HarnessReport


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run() -> AsyncIterator[Run]:
    async with FaultHarness(SETTINGS) as harness:
        report = await harness.run()
        print(report.summary())  # shown with -rA or on failure
        yield Run(harness, report)


async def test_every_confirmed_order_took_effect_exactly_once(run: Run) -> None:
    r = run.report
    assert r.messages > 500, r.summary()  # the run did real work
    assert (r.lost, r.duplicated, r.unexpected) == (0, 0, 0), r.to_json()
    assert r.drained and r.pending == 0, r.to_json()
    assert r.dead_letters == 0, r.to_json()
    assert r.orders_rolled_back > 0  # rolled-back orders existed; unexpected == 0: no effect
    for stage in (DEBIT_STAGE, COMPLETION_STAGE):
        [verdict] = [s for s in r.verdict["stages"] if s["stage"] == stage]
        assert verdict["effects"] == r.messages, verdict  # one per confirmed order, no more


async def test_every_fault_was_injected_and_recovered_from(run: Run) -> None:
    r = run.report
    counts = r.fault_counts()
    assert r.cycles == SETTINGS.cycles and not r.timed_out
    assert counts[BROKER_KILL] == 20
    assert counts[POSTGRES_RESTART] == 2
    assert counts[RELAY_KILL] == 4
    assert counts[PAYMENT_KILL] == 4
    assert counts[LEDGER_KILL] == 2
    assert all(f.recovery_s is not None and f.recovery_s > 0 for f in r.faults), r.faults
    assert r.anomalies == [], r.anomalies  # nothing died unless the harness killed it


async def test_duplicates_reached_consumers_only_as_recorded_redeliveries(run: Run) -> None:
    r = run.report
    # The kills did make the broker deliver already processed messages again (at-least-once)...
    assert r.redelivered > 0, r.summary()
    # ...and every one of them was recognised by an inbox and recorded, never acted on twice.
    for stage in r.verdict["stages"]:
        assert stage["duplicated"] == 0, stage
    # Republished outbox rows (a relay killed between confirm and commit) came back as
    # duplicates of the original message: the stages saw one message per order.
    assert r.relay_confirms >= r.messages


async def _one(dsn: str, query: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(query)
        assert row is not None
        return row
    finally:
        await conn.close()


async def _execute(dsn: str, query: str, *args: object) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


async def test_checker_on_the_runs_data_reports_a_deleted_debit(run: Run) -> None:
    dbs = run.harness.dbs
    assert dbs is not None
    victim = await _one(dbs.payments, "SELECT * FROM fault_ledger_debits ORDER BY id LIMIT 1")
    await _execute(dbs.payments, "DELETE FROM fault_ledger_debits WHERE id = $1", victim["id"])
    try:
        verdict = check((await run.harness.collect()).observations)
        assert verdict.lost == 1
        assert verdict.stage(DEBIT_STAGE).lost == [victim["order_id"]]
        assert verdict.duplicated == 0 and verdict.unexpected == 0
    finally:
        await _execute(
            dbs.payments,
            "INSERT INTO fault_ledger_debits (order_id, amount_cents, message_id)"
            " VALUES ($1, $2, $3)",
            victim["order_id"],
            victim["amount_cents"],
            victim["message_id"],
        )
    assert check((await run.harness.collect()).observations).ok


async def test_checker_on_the_runs_data_reports_a_duplicated_completion(run: Run) -> None:
    dbs = run.harness.dbs
    assert dbs is not None
    victim = await _one(dbs.ledger, "SELECT * FROM fault_completions ORDER BY id DESC LIMIT 1")
    await _execute(
        dbs.ledger,
        "INSERT INTO fault_completions (order_id, message_id) VALUES ($1, $2)",
        victim["order_id"],
        victim["message_id"],
    )
    try:
        verdict = check((await run.harness.collect()).observations)
        assert verdict.duplicated == 1
        assert verdict.stage(COMPLETION_STAGE).duplicated == {victim["order_id"]: 2}
        assert verdict.lost == 0 and verdict.unexpected == 0
    finally:
        await _execute(
            dbs.ledger,
            "DELETE FROM fault_completions WHERE id = (SELECT max(id) FROM fault_completions)",
        )
    assert check((await run.harness.collect()).observations).ok
