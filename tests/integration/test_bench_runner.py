"""The benchmark runner end to end on a tiny workload: it starts its own embedded PostgreSQL and a
``securebroker serve`` process, drives it with the Node driver over mutual TLS, and leaves the
database clean for the next workload (the peers' drivers delete their queues too; W2 used to
leave 200,000 never-consumed messages behind, which made every later workload slower).

Skipped when node or the drivers' npm packages (``npm ci`` in bench/peers) are missing.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from securebroker.bench import runner

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (PEERS / "node_modules" / "msgpackr").exists(),
    reason="needs node and `npm ci` in bench/peers",
)

TABLES = ("sb_topics", "sb_subscriptions", "sb_messages", "sb_deliveries", "sb_idempotency")


async def _rows(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        # table names are the constants above, never input
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
    finally:
        await conn.close()


async def _audited_deletes(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT topic FROM sb_audit WHERE event = 'admin' AND detail::jsonb ->> 'operation'"
            " = 'topic.delete'"
        )
        return [r["topic"] for r in rows]
    finally:
        await conn.close()


def test_a_workload_is_measured_then_its_topic_is_deleted(tmp_path: Path) -> None:
    sb = runner.start_securebroker(tmp_path)
    try:
        spec = {"workload": "W2", "messages": 200, "publishers": 2, "inflight": 8}
        result = runner.run_securebroker(sb, "W2", spec)
        assert result.get("error") is None, result
        assert (result["published"], result["confirmed"], result["errors"]) == (200, 200, 0)
        assert result["cpu_us_per_message"]["broker"] > 0
        # W2 never consumes, so its 200 messages were stored until the teardown removed them
        assert asyncio.run(_rows(sb.dsn)) == dict.fromkeys(TABLES, 0)
        (deleted,) = asyncio.run(_audited_deletes(sb.dsn))  # an audited admin action
        assert deleted.startswith("bench.w2.")
        # a broker that died during a workload: the teardown reports it instead of ending the
        # whole run (which would lose every result so far)
        sb.proc.kill()
        sb.proc.wait(timeout=30)
        problem = runner._teardown(sb, "bench.w3.gone")
        assert problem is not None and problem.startswith("Unavailable: cannot connect")
    finally:
        sb.proc.terminate()
        sb.proc.wait(timeout=30)


def test_sql_stats_report_where_postgresql_spent_each_workload(tmp_path: Path) -> None:
    """``--sql-stats``: pg_stat_statements loaded at startup (a server restart), reset before
    each workload, and the statements that took its execution time reported per message."""
    sb = runner.start_securebroker(tmp_path, sql_stats=True)
    try:
        spec = {"workload": "W3", "messages": 200, "publishers": 2, "consumers": 2, "inflight": 8}
        result = runner.run_securebroker(sb, "W3", spec)
        assert result.get("error") is None, result
        assert (result["confirmed"], result["acked"]) == (200, 200)
        assert result["cpu_us_per_message"]["postgres"] > 0  # the restarted postmaster's pid
        by_text = {q["statement"]: q for q in result["sql"]}
        publish = next(q for t, q in by_text.items() if t.startswith("SELECT sb_publish_group("))
        assert publish["toplevel"] and publish["calls_per_message"] > 0
        assert publish["exec_us_per_message"] > 0
        # the slowest single call, which can explain a tail latency the mean hides
        assert publish["max_exec_ms"] > 0
        assert not any("pg_stat_statements_reset" in t for t in by_text)  # the reset is not work
        table = runner.markdown(
            [result],
            {"started": "t", "machine": "m", "mode": "quick"}
            | {"command": "securebroker bench --sql-stats"},
        )
        assert "PostgreSQL execution time per message" in table
        assert "`SELECT sb_publish_group(" in table
        assert f"| {publish['max_exec_ms']} |" in table
    finally:
        sb.proc.terminate()
        sb.proc.wait(timeout=30)
