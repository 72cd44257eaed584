"""The fault-injection harness: the payment flow under crashes, then an accounting of every order.

Bounded in time and cycles, loopback only, reproducible from a seed. One run:

1. **Set-up** (in a private temporary directory): an embedded PostgreSQL (``fsync`` and
   ``synchronous_commit`` on) holding the broker's database and the three services' own
   databases; a development PKI with one client certificate per service; Ed25519-signed JWTs
   bound to those certificates and a deny-by-default policy granting each service only its
   topics; a file keyring (payloads encrypted at rest) and an audit signing key. The broker runs
   as ``python -m securebroker.cli serve --config broker.toml``, exactly as in production.
2. **Load**: the order service (a task here) writes orders with their outbox rows; the relay,
   payment service and ledger consumer run as worker processes (``flow.py``).
3. **Cycles**: each cycle waits for a seeded number of events of a seeded kind (relay confirms,
   payment or ledger handler runs), SIGKILLs the broker there, restarts it on the same port and
   waits until both sides work again (a confirm and a settled delivery after the restart). On
   seeded cycles a second fault follows once the flow has recovered: a PostgreSQL restart
   (``pg_ctl restart -m fast``) under load, or a SIGKILL of the relay, the payment service or the
   ledger consumer in the middle of a batch, which is then started again.
4. **Drain**: orders stop; the harness waits until every committed order has its completion (or
   the drain bound passes), stops the workers and the broker gracefully.
5. **Accounting**: ``flow.collect`` reads every database, ``checker.check`` compares.

No sleep is used to wait for anything: waits are on worker events (their stdout) or on a
process's exit, each bounded by a deadline; the only polls are for the broker's socket to listen
again and the drain's re-check of the databases between events. The short seeded delays before a
kill *are* the fault injection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import asyncpg

from securebroker import embedded
from securebroker.client import connect
from securebroker.faults import flow
from securebroker.faults.checker import Verdict, check
from securebroker.store.migrate import create_database

#: kinds of fault, as they appear in reports
BROKER_KILL = "broker_kill"
POSTGRES_RESTART = "postgres_restart"
RELAY_KILL = "relay_kill"
PAYMENT_KILL = "payment_kill"
LEDGER_KILL = "ledger_kill"

#: seconds between two looks at the databases while the drain sees worker events
DRAIN_RECHECK = 0.2

ISSUER = "https://idp.faults.invalid"
AUDIENCE = "securebroker-faults"
ADMIN = "fault-admin"


class HarnessError(Exception):
    """The harness could not do what it must (a process would not start, a wait ran out)."""


@dataclass(frozen=True)
class HarnessSettings:
    seed: int = 1
    #: broker SIGKILL cycles
    cycles: int = 20
    #: second faults, spread over seeded cycles (None: derived from ``cycles``)
    postgres_restarts: int | None = None
    relay_kills: int | None = None
    payment_kills: int | None = None
    ledger_kills: int | None = None
    #: the whole run, set-up to report, is cut short (cycles stop, drain begins) past this
    max_seconds: float = 900.0
    #: orders per second written by the order service
    order_rate: float = 100.0
    #: lease of both subscriptions: how soon a killed consumer's messages come again
    lease_seconds: float = 3.0
    #: bound on any single wait (a process starting, a recovery)
    step_timeout: float = 90.0
    #: bound on the drain after the last cycle
    drain_timeout: float = 120.0
    #: keep the working directory (logs, configs, data) instead of deleting it
    keep: bool = False
    workdir: Path | None = None

    def secondary_counts(self) -> dict[str, int]:
        n = self.cycles

        def pick(value: int | None, every: int) -> int:
            return value if value is not None else max(1, n // every)

        return {
            POSTGRES_RESTART: pick(self.postgres_restarts, 10),
            RELAY_KILL: pick(self.relay_kills, 5),
            PAYMENT_KILL: pick(self.payment_kills, 5),
            LEDGER_KILL: pick(self.ledger_kills, 10),
        }


@dataclass
class FaultRecord:
    kind: str
    cycle: int
    #: the seeded kill point, e.g. "after 7 payment handled + 12 ms"
    trigger: str
    #: from the fault to the faulty part being back (broker listening, pg_ctl done, worker up)
    restart_s: float | None = None
    #: from the restart to the first confirmed publish after it
    first_confirm_s: float | None = None
    #: from the restart to the first settled delivery of an order placed after the restart
    first_delivery_s: float | None = None
    #: from the restart until both (for a worker: its own first progress)
    recovery_s: float | None = None


@dataclass
class HarnessReport:
    seed: int
    cycles_requested: int
    cycles: int
    duration_s: float
    orders_attempted: int
    orders_rolled_back: int
    #: orders whose transaction (with its outbox row) committed: the confirmed messages
    messages: int
    #: publishes the relay had confirmed (including its retries)
    relay_confirms: int
    #: of which the broker answered duplicate=True (a retry after a kill, deduplicated)
    relay_duplicates: int
    deliveries: int
    lost: int
    duplicated: int
    unexpected: int
    pending: int
    redelivered: int
    dead_letters: int
    drained: bool
    faults: list[FaultRecord]
    #: workers or brokers that exited when nobody killed them (should be empty)
    anomalies: list[str]
    verdict: dict[str, Any]
    timed_out: bool = False
    workdir: str | None = None
    recovery: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.unexpected == 0

    @property
    def clean(self) -> bool:
        """``ok``, everything drained and settled, and no process died on its own."""
        return self.ok and self.pending == 0 and self.drained and not self.anomalies

    def fault_counts(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.faults))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fault_counts"] = self.fault_counts()
        out["ok"] = self.ok
        out["clean"] = self.clean
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        lines = [
            f"seed {self.seed}: {self.cycles}/{self.cycles_requested} broker kill cycles in "
            f"{self.duration_s:.0f} s{' (time bound reached)' if self.timed_out else ''}",
            f"faults: {', '.join(f'{k} {v}' for k, v in sorted(self.fault_counts().items()))}",
            f"messages (confirmed orders): {self.messages}; rolled back on purpose: "
            f"{self.orders_rolled_back}; relay confirms {self.relay_confirms} "
            f"({self.relay_duplicates} deduplicated retries); deliveries {self.deliveries}",
            f"lost {self.lost}, duplicated {self.duplicated}, unexpected {self.unexpected}, "
            f"pending {self.pending}, dead letters {self.dead_letters}, "
            f"redeliveries recorded (allowed) {self.redelivered}",
        ]
        for kind, st in sorted(self.recovery.items()):
            lines.append(
                f"{kind} x{int(st['n'])}: back in p50 {st.get('restart_p50', 0):.2f} s "
                f"(max {st.get('restart_max', 0):.2f}), flow recovered in p50 "
                f"{st.get('recovery_p50', 0):.2f} s (max {st.get('recovery_max', 0):.2f})"
            )
        if self.anomalies:
            lines.append(f"anomalies: {'; '.join(self.anomalies)}")
        if not self.drained:
            lines.append("NOT DRAINED: some confirmed orders had not completed by the bound")
        lines.append("RESULT: " + ("OK" if self.clean else "FAILED"))
        return "\n".join(lines)


# -- events from the workers -------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    role: str
    kind: str
    t: float
    fields: tuple[str, ...]


class _Watch:
    """Resolves on the first event matching ``pred``."""

    def __init__(self, pred: Callable[[Event], bool]) -> None:
        self.pred = pred
        self.future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()


class EventBus:
    """Counts worker events and wakes whoever waits for a particular one."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.confirmed = 0
        self.duplicates = 0
        self._watches: list[_Watch] = []
        self.activity = asyncio.Event()
        #: ``error`` events (unexpected exceptions in a worker): anomalies
        self.errors: list[str] = []

    def publish(self, ev: Event) -> None:
        self.counts[(ev.role, ev.kind)] += 1
        if ev.role == "relay" and ev.kind == "confirmed" and len(ev.fields) >= 2:
            self.confirmed += int(ev.fields[0])
            self.duplicates += int(ev.fields[1])
        for w in list(self._watches):
            if not w.future.done() and w.pred(ev):
                w.future.set_result(ev)
        self._watches = [w for w in self._watches if not w.future.done()]
        if ev.kind == "error":
            self.errors.append(f"{ev.role}: {' '.join(ev.fields)}")
        self.activity.set()

    def watch(self, pred: Callable[[Event], bool]) -> asyncio.Future[Event]:
        w = _Watch(pred)
        self._watches.append(w)
        return w.future

    def nth(self, role: str, kinds: Iterable[str], n: int) -> asyncio.Future[Event]:
        """The ``n``-th matching event from now on."""
        wanted = frozenset(kinds)
        seen = 0

        def pred(ev: Event) -> bool:
            nonlocal seen
            if ev.role == role and ev.kind in wanted:
                seen += 1
            return seen >= n

        return self.watch(pred)

    def after(
        self, role: str, kinds: Iterable[str], since: Since, *, fresh: bool = False
    ) -> asyncio.Future[Event]:
        """The first matching event stamped after ``since.t`` (set when the fault ends); with
        ``fresh``, only one about an order placed after that (its first field), so a delivery
        received before the fault and settled after it does not count as recovery."""
        wanted = frozenset(kinds)

        def pred(ev: Event) -> bool:
            if ev.role != role or ev.kind not in wanted or ev.t <= since.t:
                return False
            return not fresh or (bool(ev.fields) and flow.order_number(ev.fields[0]) > since.order)

        return self.watch(pred)


@dataclass
class Since:
    """When a fault ended: a monotonic time and the number of the last order placed by then."""

    t: float = math.inf
    order: int = 2**62

    def mark(self, orders: flow.OrderService | None) -> None:
        self.t = time.monotonic()
        self.order = orders.placed if orders is not None else 0


class Managed:
    """A child process whose stdout lines are events and whose stderr goes to a log file."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: TextIO) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.expected_exit = False
        self.reader: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def kill(self) -> None:
        self.expected_exit = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self._finish()

    async def stop(self, bound: float) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop within ``bound``."""
        self.expected_exit = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(bound):
                code = await self.proc.wait()
        except TimeoutError:
            await self.kill()
            code = self.proc.returncode if self.proc.returncode is not None else -9
        await self._finish()
        return code

    async def _finish(self) -> None:
        if self.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(5):
                    await self.reader
        if not self.log.closed:
            self.log.close()


def _stats(faults: list[FaultRecord]) -> dict[str, float]:
    """Restart and recovery times of one kind of fault: count, median, maximum (seconds)."""
    out = {"n": float(len(faults))}
    for name in ("restart_s", "recovery_s"):
        values = sorted(v for f in faults if (v := getattr(f, name)) is not None)
        if values:
            base = name.removesuffix("_s")
            out[f"{base}_p50"] = round(statistics.median(values), 3)
            out[f"{base}_max"] = round(values[-1], 3)
    return out


def _policy() -> str:
    rules = [
        ("order-relay-publish", "publish", flow.REQUESTED, flow.IDENTITIES["relay"]),
        ("payment-consume", "consume", flow.REQUESTED, flow.IDENTITIES["payment"]),
        ("payment-publish", "publish", flow.COMPLETED, flow.IDENTITIES["payment"]),
        ("ledger-consume", "consume", flow.COMPLETED, flow.IDENTITIES["ledger"]),
        ("fault-admin", "admin", "payments.#", ADMIN),
    ]
    lines = ["version = 1", ""]
    for rule_id, action, topic, subject in rules:
        lines += [
            "[[rules]]",
            f'id = "{rule_id}"',
            f'actions = ["{action}"]',
            f'topics = ["{topic}"]',
            f'subjects = ["{subject}"]',
            "",
        ]
    return "\n".join(lines)


def _securebroker_command() -> list[str]:
    """The installed ``securebroker`` entry point beside this interpreter, as operators run it;
    ``python -m securebroker.cli`` where it is not installed."""
    script = Path(sys.executable).parent / "securebroker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "securebroker.cli"]


def _toml(value: object) -> str:
    return json.dumps(str(value))  # a TOML basic string (JSON's escapes are valid TOML)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class _Identity:
    cert: str
    key: str
    token: str


class FaultHarness:
    """``async with FaultHarness(settings) as h: report = await h.run()``; the databases stay
    readable (``h.dbs``, ``await h.collect()``) until the block ends; everything started is
    stopped and deleted on the way out, failure or not."""

    def __init__(self, settings: HarnessSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)  # noqa: S311 - reproducible faults, not secrets
        self._own_workdir = settings.workdir is None
        self._made_workdir = False
        #: created on entering the ``async with`` block (a temporary one unless given)
        self.workdir = settings.workdir or Path(tempfile.gettempdir()) / "sb-faults-unset"
        self.bus: EventBus | None = None
        self.server: Any = None
        self.dbs: flow.FlowDatabases | None = None
        self.port = 0
        self.ca = ""
        self.identities: dict[str, _Identity] = {}
        self.broker: Managed | None = None
        self.workers: dict[str, Managed] = {}
        self.orders: flow.OrderService | None = None
        self._orders_task: asyncio.Task[None] | None = None
        self._orders_stop = asyncio.Event()
        self.faults: list[FaultRecord] = []
        self._kills: Counter[str] = Counter()
        self.anomalies: list[str] = []
        self._started = time.monotonic()
        self._closing = False
        #: every worker event, one line each, kept with the logs when ``keep`` is set
        self._events: TextIO | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> FaultHarness:
        try:
            await self._setup()
        except BaseException:
            await self._teardown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._teardown()

    @property
    def config_path(self) -> Path:
        return self.workdir / "broker.toml"

    async def _setup(self) -> None:
        self._started = time.monotonic()
        self.bus = EventBus()
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="sb-faults-"))
            self._made_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.settings.keep:
            self._events = (self.workdir / "events.log").open("a", encoding="utf-8")
        await asyncio.to_thread(self._files_and_postgres)
        assert self.dbs is not None
        admin = self.server.get_uri("postgres")
        await create_database(admin, self.dbs.broker, "securebroker", fresh=True)
        await embedded.tune(admin)
        conn = await asyncpg.connect(admin)
        try:
            for name in ("orders", "payments", "ledger"):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await flow.install_schemas(self.dbs.orders, self.dbs.payments, self.dbs.ledger)
        await self._start_broker()
        await self._topology()

    def _files_and_postgres(self) -> None:
        """PKI, tokens, keys, policy, config; the embedded PostgreSQL (blocking calls)."""
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415

        from securebroker.audit.checkpoint import SigningKey  # noqa: PLC0415
        from securebroker.authz.devkit import cert_thumbprint, public_jwk  # noqa: PLC0415
        from securebroker.authz.tokens import mint_token  # noqa: PLC0415
        from securebroker.crypto.filekeyring import FileKeyring  # noqa: PLC0415
        from securebroker.secrets import ensure_random_key, write_private  # noqa: PLC0415
        from securebroker.tls import ensure_dev_pki  # noqa: PLC0415

        w = self.workdir
        names = (ADMIN, *flow.IDENTITIES.values())
        pki = ensure_dev_pki(w / "certs", clients=names)
        self.ca = str(pki.ca_cert)
        signing = ed25519.Ed25519PrivateKey.generate()
        pem = signing.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(w / "jwt-signing.key", pem)
        jwk = public_jwk(signing.public_key())
        (w / "jwks.json").write_text(json.dumps({"keys": [jwk]}), encoding="utf-8")
        for name in names:
            cert, key = pki.clients[name]
            token = mint_token(
                pem,
                kid=jwk["kid"],
                subject=name,
                issuer=ISSUER,
                audience=AUDIENCE,
                lifetime=timedelta(hours=12),
                bind_thumbprint=cert_thumbprint(cert),
            )
            self.identities[name] = _Identity(str(cert), str(key), token)
        policy = w / "policy"
        policy.mkdir(exist_ok=True)
        (policy / "payments.toml").write_text(_policy(), encoding="utf-8")
        keyring = w / "keyring.json"
        FileKeyring.create(keyring)
        audit_key = w / "audit-signing.pem"
        SigningKey.create(audit_key)
        fingerprint = ensure_random_key(w / "fingerprint.key")

        self.server = embedded.start(w / "pgdata", keep=False)
        broker_dsn = embedded.database_uri(self.server, "securebroker")
        self.dbs = flow.FlowDatabases(
            broker=broker_dsn,
            orders=embedded.database_uri(self.server, "orders"),
            payments=embedded.database_uri(self.server, "payments"),
            ledger=embedded.database_uri(self.server, "ledger"),
        )
        self.port = _free_port()
        self.config_path.write_text(
            "\n".join(
                [
                    "[database]",
                    f"dsn = {_toml(broker_dsn)}",
                    "pool_min = 2",
                    "pool_max = 10",
                    "[broker]",
                    f"fingerprint_key_file = {_toml(fingerprint)}",
                    "sweep_interval_ms = 250",
                    "[listener]",
                    'host = "127.0.0.1"',
                    f"port = {self.port}",
                    f"cert = {_toml(pki.server_cert)}",
                    f"key = {_toml(pki.server_key)}",
                    f"ca = {_toml(pki.ca_cert)}",
                    "[auth]",
                    f"policy = {_toml(policy)}",
                    f"jwks_file = {_toml(w / 'jwks.json')}",
                    f"issuer = {_toml(ISSUER)}",
                    f"audience = {_toml(AUDIENCE)}",
                    "require_token = true",
                    "require_bound_token = true",
                    "[encryption]",
                    'keyring = "file"',
                    f"keyring_file = {_toml(keyring)}",
                    "[audit]",
                    f"signing_key = {_toml(audit_key)}",
                    "[logging]",
                    'level = "warning"',
                    "",
                ]
            ),
            encoding="utf-8",
        )

    async def _topology(self) -> None:
        ident = self.identities[ADMIN]
        client = await connect(
            "127.0.0.1",
            self.port,
            cert=ident.cert,
            key=ident.key,
            ca=self.ca,
            token=ident.token,
            reconnect=False,
        )
        try:
            for topic, sub in (
                (flow.REQUESTED, flow.PAYMENT_SUBSCRIPTION),
                (flow.COMPLETED, flow.LEDGER_SUBSCRIPTION),
            ):
                await client.admin("topic.create", name=topic)
                await client.admin(
                    "subscription.create",
                    name=sub,
                    topic=topic,
                    lease_seconds=self.settings.lease_seconds,
                    max_attempts=1000,
                    backoff_base_seconds=0.05,
                    backoff_max_seconds=1.0,
                )
        finally:
            await client.close()

    async def _teardown(self) -> None:
        self._closing = True
        self._orders_stop.set()
        if self._orders_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(30):
                    await self._orders_task
            self._orders_task.cancel()
        for w in list(self.workers.values()):
            await w.kill()
        if self.broker is not None:
            await self.broker.kill()
        if self.server is not None:
            await embedded.stop_restarted(self.server, log_to=self.workdir / "pg_ctl.log")
            self.server = None
        if self._events is not None:
            self._events.close()
        if self._made_workdir and not self.settings.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- processes ------------------------------------------------------------------------------
    def _remaining(self) -> float:
        return self.settings.max_seconds - (time.monotonic() - self._started)

    def _bound(self, limit: float | None = None) -> float:
        """A wait's bound: the step timeout (or ``limit``), never past a little after the run's
        bound (so a hang cannot outlive it by much)."""
        return max(min(limit or self.settings.step_timeout, self._remaining() + 60.0), 1.0)

    async def _spawn(self, name: str, args: list[str], *, events: bool) -> Managed:
        log = (self.workdir / f"{name}.log").open("a", encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if events else log,
            stderr=log,
            cwd=self.workdir,
        )
        managed = Managed(name, proc, log)
        managed.reader = asyncio.ensure_future(self._read(managed, events=events))
        return managed

    async def _read(self, m: Managed, *, events: bool) -> None:
        if events:
            assert m.proc.stdout is not None and self.bus is not None
            while True:
                raw = await m.proc.stdout.readline()
                if not raw:
                    break
                kind, _, rest = raw.decode(errors="replace").strip().partition(" ")
                t, _, tail = rest.partition(" ")
                try:
                    stamp = float(t)
                except ValueError:
                    continue
                self.bus.publish(Event(m.name, kind, stamp, tuple(tail.split())))
                if self._events is not None:
                    self._events.write(f"{m.name} {kind} {stamp:.6f} {tail}\n")
        code = await m.proc.wait()
        if not m.expected_exit and not self._closing:
            self.anomalies.append(f"{m.name} exited on its own with status {code}")

    async def _start_broker(self) -> float:
        """Start the broker; returns the seconds until it listened."""
        t0 = time.monotonic()
        self.broker = await self._spawn(
            "broker",
            [*_securebroker_command(), "serve", "--config", str(self.config_path)],
            events=False,
        )
        deadline = t0 + self._bound(60.0)
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                pass
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return time.monotonic() - t0
            if not self.broker.running:
                tail = (self.workdir / "broker.log").read_text(errors="replace")[-1500:]
                raise HarnessError(f"broker exited on start:\n{tail}")
            if time.monotonic() > deadline:
                raise HarnessError("broker did not listen in time")
            await asyncio.sleep(0.02)  # waiting for an external process to listen

    async def _start_worker(self, role: str) -> Managed:
        assert self.dbs is not None
        ident = self.identities[flow.IDENTITIES[role]]
        dsn = {"relay": self.dbs.orders, "payment": self.dbs.payments, "ledger": self.dbs.ledger}
        sub = {"payment": flow.PAYMENT_SUBSCRIPTION, "ledger": flow.LEDGER_SUBSCRIPTION}
        spec = flow.WorkerSpec(
            role=role,
            host="127.0.0.1",
            port=self.port,
            ca=self.ca,
            cert=ident.cert,
            key=ident.key,
            token=ident.token,
            dsn=dsn[role],
            subscription=sub.get(role, ""),
            retry_for=self.settings.step_timeout,
        )
        path = spec.dump(self.workdir / f"{role}.json")
        worker = await self._spawn(
            role, [sys.executable, "-m", "securebroker.faults.flow", str(path)], events=True
        )
        self.workers[role] = worker
        return worker

    async def _pg_ctl(self, *args: str) -> None:
        code = await embedded.pg_ctl(self.server, *args, log_to=self.workdir / "pg_ctl.log")
        if code != 0:
            raise HarnessError(f"pg_ctl {' '.join(args)} failed ({code}); see pg_ctl.log")

    # -- waits ----------------------------------------------------------------------------------
    async def _await(self, fut: asyncio.Future[Event], what: str) -> Event:
        try:
            async with asyncio.timeout(self._bound()):
                return await fut
        except TimeoutError:
            fut.cancel()
            raise HarnessError(f"timed out waiting for {what} ({await self._diagnose()})") from None

    def _recovery(self, since: Since, roles: str) -> dict[str, asyncio.Future[Event]]:
        """Watches for the flow working again after ``since`` (registered before the fault,
        armed when ``since`` is marked at the restart): a confirm, and the settled delivery of
        an order placed after the restart."""
        assert self.bus is not None
        settled = ["processed", "redelivery"]
        if roles == "both":
            return {
                "confirm": self.bus.after("relay", ["confirmed"], since),
                "delivery": self.bus.after("payment", settled, since, fresh=True),
            }
        if roles == "relay":
            return {"own": self.bus.after("relay", ["confirmed"], since)}
        return {"own": self.bus.after(roles, settled, since, fresh=True)}

    async def _recovered(
        self, record: FaultRecord, since: Since, watches: dict[str, asyncio.Future[Event]]
    ) -> None:
        """Wait for the watches and record how long recovery took."""
        try:
            got = {k: await self._await(f, f"{k} after {record.kind}") for k, f in watches.items()}
        finally:
            for f in watches.values():
                f.cancel()
        if "own" in got:
            own = got["own"].t - since.t
            if "relay" in record.kind:
                record.first_confirm_s = own
            else:
                record.first_delivery_s = own
            record.recovery_s = own
            return
        record.first_confirm_s = got["confirm"].t - since.t
        record.first_delivery_s = got["delivery"].t - since.t
        record.recovery_s = max(record.first_confirm_s, record.first_delivery_s)

    async def _diagnose(self) -> str:
        """What is waiting where, for an error message: a stalled flow names its stall."""
        assert self.dbs is not None
        try:
            conn = await asyncpg.connect(self.dbs.broker)
            try:
                rows = await conn.fetch(flow.Q["deliveries_by_state"])
            finally:
                await conn.close()
            unsent = len(await flow.unsent_outbox(self.dbs.orders))
        except flow.TRANSIENT as exc:
            return f"could not look: {exc.__class__.__name__}"
        states = {0: "ready", 1: "leased", 2: "dead"}
        held = ", ".join(f"{r['name']} {states[r['state']]} {r['n']}" for r in rows)
        return f"broker holds: {held or 'nothing'}; unsent outbox rows: {unsent}"

    def _trigger(self, choices: list[tuple[str, str, int]]) -> tuple[asyncio.Future[Event], str]:
        assert self.bus is not None
        role, kind, most = self.rng.choice(choices)
        n = self.rng.randint(1, most)
        return self.bus.nth(role, [kind], n), f"after {n} {role} {kind}"

    async def _jitter(self, most_ms: int) -> int:
        """A seeded pause of up to ``most_ms`` before a kill: part of the fault injection."""
        ms = self.rng.randint(0, most_ms)
        if ms:
            await asyncio.sleep(ms / 1000)
        return ms

    # -- faults ---------------------------------------------------------------------------------
    async def _broker_kill(self, cycle: int) -> None:
        fut, trigger = self._trigger(
            [("relay", "confirmed", 8), ("payment", "handled", 20), ("ledger", "handled", 20)]
        )
        await self._await(fut, trigger)
        ms = await self._jitter(20)
        record = FaultRecord(BROKER_KILL, cycle, f"{trigger} + {ms} ms")
        assert self.broker is not None
        since = Since()
        watches = self._recovery(since, "both")
        try:
            await self.broker.kill()
            since.mark(self.orders)
            record.restart_s = await self._start_broker()
        except BaseException:
            for f in watches.values():
                f.cancel()
            raise
        await self._recovered(record, since, watches)
        self.faults.append(record)

    async def _postgres_restart(self, cycle: int) -> None:
        fut, trigger = self._trigger([("payment", "handled", 15), ("relay", "confirmed", 5)])
        await self._await(fut, trigger)
        record = FaultRecord(POSTGRES_RESTART, cycle, trigger)
        since = Since()
        watches = self._recovery(since, "both")
        try:
            t0 = time.monotonic()
            await self._pg_ctl("restart", "-m", "fast")
            since.mark(self.orders)
            record.restart_s = since.t - t0
        except BaseException:
            for f in watches.values():
                f.cancel()
            raise
        await self._recovered(record, since, watches)
        self.faults.append(record)

    async def _worker_kill(self, role: str, kind: str, cycle: int) -> None:
        # Every other kill of a consumer is aimed at the moment its transaction has committed
        # and its settle is on the way (the redelivery case); the others land anywhere around
        # the handler. The relay's window between the broker's confirm and its own COMMIT is a
        # millisecond or two: its kills are aimed close to the confirm.
        self._kills[role] += 1
        if role == "relay":
            fut, trigger = self._trigger([(role, "confirmed", 5)])
            most_ms = 2
        elif self._kills[role] % 2 == 1:
            fut, trigger = self._trigger([(role, "settling", 15)])
            most_ms = 0
        else:
            fut, trigger = self._trigger([(role, "handled", 15)])
            most_ms = 10
        await self._await(fut, trigger)
        ms = await self._jitter(most_ms)
        record = FaultRecord(kind, cycle, f"{trigger} + {ms} ms")
        since = Since()
        watches = self._recovery(since, role)
        ready = self._expect_ready(role)
        try:
            await self.workers[role].kill()
            since.mark(self.orders)
            await self._start_worker(role)
            record.restart_s = (await self._await(ready, f"{role} ready")).t - since.t
        except BaseException:
            for f in [*watches.values(), ready]:
                f.cancel()
            raise
        await self._recovered(record, since, watches)
        self.faults.append(record)

    def _expect_ready(self, role: str) -> asyncio.Future[Event]:
        assert self.bus is not None
        return self.bus.watch(lambda ev: ev.role == role and ev.kind == "ready")

    async def _revive(self) -> None:
        """Restart whatever died on its own (recorded as an anomaly), so the run goes on."""
        task = self._orders_task
        if task is not None and task.done() and not self._orders_stop.is_set():
            exc = task.exception()
            self.anomalies.append(f"order service failed: {exc!r}")
            assert self.orders is not None
            self._orders_task = asyncio.ensure_future(self.orders.run(self._orders_stop))
        if self.broker is not None and not self.broker.running:
            await self.broker.kill()
            await self._start_broker()
        for role, w in list(self.workers.items()):
            if not w.running:
                await w.kill()
                await self._start_worker(role)

    # -- the run --------------------------------------------------------------------------------
    def _schedule(self) -> dict[int, list[str]]:
        plan: dict[int, list[str]] = {}
        cycles = list(range(self.settings.cycles))
        for kind, count in self.settings.secondary_counts().items():
            for i in range(count):
                # spread each kind over the run, seeded within its slice
                lo = i * len(cycles) // count
                hi = max(lo, (i + 1) * len(cycles) // count - 1)
                plan.setdefault(self.rng.randint(lo, hi), []).append(kind)
        for kinds in plan.values():
            self.rng.shuffle(kinds)
        return plan

    async def run(self) -> HarnessReport:
        assert self.bus is not None and self.dbs is not None
        s = self.settings
        bus = self.bus
        ready = [self._expect_ready(role) for role in flow.ROLES]
        for role in flow.ROLES:
            await self._start_worker(role)
        for role, fut in zip(flow.ROLES, ready, strict=True):
            await self._await(fut, f"{role} ready")
        self.orders = flow.OrderService(
            self.dbs.orders,
            random.Random(self.rng.random()),  # noqa: S311 - reproducible load, not secrets
            prefix=f"o{s.seed}",
            rate=s.order_rate,
        )
        self._orders_task = asyncio.ensure_future(self.orders.run(self._orders_stop))
        # warm-up: the whole flow works once before the first fault
        await self._await(bus.nth("ledger", ["processed"], 1), "the first completion")

        plan = self._schedule()
        done = 0
        timed_out = False
        for cycle in range(s.cycles):
            if self._remaining() <= 0:
                timed_out = True
                break
            await self._broker_kill(cycle)
            done += 1
            for kind in plan.get(cycle, []):
                await self._revive()
                if kind == POSTGRES_RESTART:
                    await self._postgres_restart(cycle)
                elif kind == RELAY_KILL:
                    await self._worker_kill("relay", kind, cycle)
                elif kind == PAYMENT_KILL:
                    await self._worker_kill("payment", kind, cycle)
                else:
                    await self._worker_kill("ledger", kind, cycle)
            await self._revive()

        drained = await self._drain()
        for w in self.workers.values():
            await w.stop(30)
        if self.broker is not None:
            await self.broker.stop(30)
        collected = await flow.collect(self.dbs)
        verdict = check(collected.observations)
        return self._report(done, timed_out, drained, verdict, len(collected.dead_letters))

    async def _drain(self) -> bool:
        """Stop taking orders; wait until every committed order has its completion.

        The databases are asked again after each burst of worker events (at most every
        ``DRAIN_RECHECK`` seconds while events flow, and at least once a second), until the
        drain bound."""
        assert self.bus is not None and self.dbs is not None
        self._orders_stop.set()
        if self._orders_task is not None:
            try:
                await self._orders_task
            except Exception as exc:  # noqa: BLE001 - reported, and the drain goes on
                self.anomalies.append(f"order service failed: {exc!r}")
        deadline = time.monotonic() + self.settings.drain_timeout
        orders = await asyncpg.connect(self.dbs.orders)
        ledger = await asyncpg.connect(self.dbs.ledger)
        try:
            while True:
                self.bus.activity.clear()
                confirmed, completed = await flow.completed_count(orders, ledger)
                if completed >= confirmed:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, 1.0)):
                        await self.bus.activity.wait()
                        await asyncio.sleep(DRAIN_RECHECK)  # let a burst of events pass
        finally:
            await orders.close()
            await ledger.close()

    async def collect(self) -> flow.Collected:
        assert self.dbs is not None
        return await flow.collect(self.dbs)

    def _report(
        self, cycles: int, timed_out: bool, drained: bool, verdict: Verdict, dead: int
    ) -> HarnessReport:
        assert self.bus is not None and self.orders is not None
        by_kind: dict[str, list[FaultRecord]] = {}
        for f in self.faults:
            by_kind.setdefault(f.kind, []).append(f)
        c = self.bus.counts
        return HarnessReport(
            seed=self.settings.seed,
            cycles_requested=self.settings.cycles,
            cycles=cycles,
            duration_s=round(time.monotonic() - self._started, 1),
            orders_attempted=self.orders.stats.attempted,
            orders_rolled_back=self.orders.stats.rolled_back,
            messages=verdict.confirmed,
            relay_confirms=self.bus.confirmed,
            relay_duplicates=self.bus.duplicates,
            deliveries=c[("payment", "delivered")] + c[("ledger", "delivered")],
            lost=verdict.lost,
            duplicated=verdict.duplicated,
            unexpected=verdict.unexpected,
            pending=verdict.pending,
            redelivered=verdict.redelivered,
            dead_letters=dead,
            drained=drained,
            faults=list(self.faults),
            anomalies=[*self.anomalies, *self.bus.errors],
            verdict=verdict.to_dict(),
            timed_out=timed_out,
            workdir=str(self.workdir) if self.settings.keep else None,
            recovery={k: _stats(v) for k, v in sorted(by_kind.items())},
        )


async def run_harness(settings: HarnessSettings) -> HarnessReport:
    """One complete run: set up, cycles, drain, accounting, tear down."""
    async with FaultHarness(settings) as harness:
        return await harness.run()
