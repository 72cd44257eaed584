"""A broker crash between a group commit's COMMIT and its confirms loses and duplicates nothing.

DESIGN §3: a confirm means "committed", and a publish whose outcome the producer never learned is
retried with the same idempotency key, which can only come back as the original message with
``duplicate=True``. The dangerous moment for that promise is a crash *after* the shared
transaction committed but *before* any of its confirms left: the rows exist, no producer knows.

``crash_broker.py`` is the broker process (``BrokerApp`` from a config file, mutual TLS, group
commit with one committer) with a store that calls ``os._exit`` right after its Nth publishing
COMMIT returns, before the committer resolves a single future. The test drives it with the real
SDK over mutual TLS:

1. a batch, confirmed before the crash (commit 1);
2. with ``sb_messages`` locked from the test, a "gate" publish that the only committer takes
   alone and then waits on the lock in (commit 2), then GROUP pipelined publishes that all queue
   behind it (the process reports each one queued); releasing the lock lets the gate commit and
   the GROUP requests commit together as one group (commit 3), where the process dies.

Then, before any restart, the database already holds the group's rows although none of its
publishes has a confirm (the control that the crash came after COMMIT). A normal broker
(``securebroker serve``) starts on the same port; the SDK reconnects and retries the unconfirmed
publishes with their keys, and each comes back ``duplicate=True`` with the stored id. The tables
hold exactly one message, one idempotency claim and one delivery per key, and a consumer gets
every message exactly once. Every wait is on an event (a line from the process, its exit, a
client future), bounded by a timeout that only matters when something hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from crash_broker import CRASH_EXIT
from native_fixtures import CLIENT, CLIENT_PRINCIPAL, FP_KEY, IO_TIMEOUT, TlsMaterial

from securebroker.audit.checkpoint import SigningKey
from securebroker.client import Client, connect
from securebroker.core.broker import Broker
from securebroker.core.model import PublishRequest, PublishResult
from securebroker.crypto.filekeyring import FileKeyring
from securebroker.secrets import ensure_random_key
from securebroker.store.postgres import PostgresStore

T = TypeVar("T")

CRASH_BROKER = Path(__file__).with_name("crash_broker.py")
TOPIC, SUB = "orders.placed", "orders.billing"
#: messages of the batch confirmed before the crash
BATCH = 8
#: publish requests committed together in the group whose confirms the crash swallows
GROUP = 12
#: the batch is commit 1, the gate request commit 2, the group commit 3
CRASH_AFTER = 3
#: bound on a broker process's start (interpreter, imports, pools); never slept on
START_TIMEOUT = 60.0
#: how long the SDK keeps retrying an unconfirmed publish (covers the restart)
RETRY_FOR = 90.0


def payload(key: str) -> bytes:
    return f"order {key}".encode()


def request(key: str) -> PublishRequest:
    return PublishRequest(TOPIC, payload(key), idempotency_key=key)


def _securebroker_command() -> list[str]:
    script = Path(sys.executable).parent / "securebroker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "securebroker.cli"]


#: The broker denies by default: the test client (certificate only) may publish and consume.
POLICY = f"""\
version = 1

[[rules]]
id = "crash-test-client"
actions = ["publish", "consume"]
topics = ["{TOPIC}"]
certificates = ["{CLIENT_PRINCIPAL}"]
"""


def write_config(
    path: Path, *, dsn: str, tls: TlsMaterial, key_file: Path, port: int, committers: int
) -> Path:
    def s(value: object) -> str:  # a TOML basic string (JSON's escapes are valid TOML)
        return json.dumps(str(value))

    policy = path.with_suffix(".policy.toml")
    policy.write_text(POLICY, encoding="utf-8")
    keyring = path.parent / "keyring.json"  # shared by every broker of the test
    if not keyring.exists():  # payloads encrypted at rest, as in production
        FileKeyring.create(keyring)
    audit_key = path.parent / "audit-signing.pem"  # and audited, as in production
    if not audit_key.exists():
        SigningKey.create(audit_key)
    path.write_text(
        "\n".join(
            [
                "[auth]",
                f"policy = {s(policy)}",
                "require_token = false",
                "[database]",
                f"dsn = {s(dsn)}",
                "pool_min = 1",
                "pool_max = 8",
                "[broker]",
                f"fingerprint_key_file = {s(key_file)}",
                f"group_committers = {committers}",
                "[encryption]",
                'keyring = "file"',
                f"keyring_file = {s(keyring)}",
                "[audit]",
                f"signing_key = {s(audit_key)}",
                "[listener]",
                'host = "127.0.0.1"',
                f"port = {port}",
                f"cert = {s(tls.pki.server_cert)}",
                f"key = {s(tls.pki.server_key)}",
                f"ca = {s(tls.pki.ca_cert)}",
                f"crl = {s(tls.crl)}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return path


class BrokerProcess:
    """A broker subprocess: stdout read line by line as events, stderr kept in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr
        self.lines: list[str] = []

    @classmethod
    async def start(cls, args: list[str], stderr: Path) -> BrokerProcess:
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        return cls(proc, stderr)

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    async def expect(self, word: str, bound: float = IO_TIMEOUT) -> list[str]:
        """Read events until one named ``word``; return its fields (the others are kept)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(bound):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    code = await self.proc.wait()
                    raise AssertionError(
                        f"broker exited ({code}) before {word!r}; events {self.lines}; "
                        f"stderr:\n{self.stderr()}"
                    )
                line = raw.decode().strip()
                self.lines.append(line)
                name, *fields = line.split()
                if name == word:
                    return fields

    async def wait(self, bound: float = IO_TIMEOUT) -> int:
        async with asyncio.timeout(bound):
            return await self.proc.wait()

    async def stop(self) -> int:
        """SIGTERM (graceful shutdown) and wait; SIGKILL only if that hangs."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait(START_TIMEOUT)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise

    async def while_running(self, work: Awaitable[T], bound: float) -> T:
        """Await ``work``, failing at once (with stderr) if the process exits first."""
        task = asyncio.ensure_future(work)
        died = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait(
                {task, died}, timeout=bound, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            died.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise AssertionError(
            f"broker exited ({self.proc.returncode}) or timed out first; stderr:\n{self.stderr()}"
        )


@contextlib.asynccontextmanager
async def broker_processes() -> AsyncIterator[list[BrokerProcess]]:
    """Every process started in the block is stopped (or already dead) when it ends."""
    procs: list[BrokerProcess] = []
    try:
        yield procs
    finally:
        for p in procs:
            await p.stop()


async def stored(db: asyncpg.Connection) -> dict[str, Any]:
    """What the database holds per idempotency key: message ids, claims, deliveries."""
    messages: dict[str, list[uuid.UUID]] = {}
    for r in await db.fetch(
        "SELECT m.idempotency_key, m.id FROM sb_messages m"
        " JOIN sb_topics t ON t.id = m.topic_id WHERE t.name = $1 ORDER BY m.seq",
        TOPIC,
    ):
        messages.setdefault(r["idempotency_key"], []).append(r["id"])
    claims = {
        r["key"]: r["message_id"]
        for r in await db.fetch("SELECT key, message_id FROM sb_idempotency")
    }
    deliveries = Counter(
        r["message_id"]
        for r in await db.fetch(
            "SELECT d.message_id FROM sb_deliveries d"
            " JOIN sb_subscriptions s ON s.id = d.subscription_id WHERE s.name = $1",
            SUB,
        )
    )
    return {"messages": messages, "claims": claims, "deliveries": deliveries}


async def create_queue(dsn: str) -> None:
    store = await PostgresStore.connect(dsn, min_size=1, max_size=1)
    try:
        broker = Broker(store, fingerprint_key=FP_KEY)
        await broker.create_topic(TOPIC)
        await broker.create_subscription(SUB, TOPIC)
    finally:
        await store.close()


async def connect_client(port: int, tls: TlsMaterial) -> Client:
    cert, key = tls.pki.clients[CLIENT]
    async with asyncio.timeout(IO_TIMEOUT):
        return await connect(
            "127.0.0.1",
            port,
            cert=cert,
            key=key,
            ca=tls.pki.ca_cert,
            reconnect=True,
            connect_timeout=IO_TIMEOUT,
            retry_for=RETRY_FOR,
        )


def pairs(fields: list[str]) -> dict[str, uuid.UUID]:
    """``KEY=ID`` fields of a ``committed``/``crashing`` event."""
    out = {}
    for field in fields:
        key, _, mid = field.partition("=")
        out[key] = uuid.UUID(mid)
    return out


async def test_crash_between_group_commit_and_confirms_loses_and_duplicates_nothing(
    pg_dsn: str, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    await create_queue(pg_dsn)
    key_file = ensure_random_key(tmp_path / "fingerprint.key")
    batch_keys = [f"batch-{i}" for i in range(BATCH)]
    group_keys = [f"group-{i}" for i in range(GROUP)]
    all_keys = [*batch_keys, "gate", *group_keys]

    db = await asyncpg.connect(pg_dsn)
    try:
        async with broker_processes() as procs:
            config = write_config(
                tmp_path / "crashing.toml",
                dsn=pg_dsn,
                tls=tls_material,
                key_file=key_file,
                port=0,
                committers=1,  # one committer: which requests share a commit is deterministic
            )
            crashing = await BrokerProcess.start(
                [sys.executable, str(CRASH_BROKER), str(config), str(CRASH_AFTER)],
                tmp_path / "crashing.stderr",
            )
            procs.append(crashing)
            port = int((await crashing.expect("listening", START_TIMEOUT))[0])
            client = await connect_client(port, tls_material)
            publishes: list[asyncio.Future[list[PublishResult]]] = []
            try:
                # -- 1. confirmed before the crash (commit 1) ----------------------------------
                confirmed = await client.publish_batch([request(k) for k in batch_keys])
                assert [r.duplicate for r in confirmed] == [False] * BATCH
                first = await crashing.expect("committed")
                assert first[0] == "1"
                assert pairs(first[1:]) == {
                    k: r.message_id for k, r in zip(batch_keys, confirmed, strict=True)
                }

                # -- 2. the gate holds the only committer; the group queues behind it ---------
                locker = await asyncpg.connect(pg_dsn)
                try:
                    lock = locker.transaction()
                    await lock.start()
                    await locker.execute("LOCK TABLE sb_messages IN EXCLUSIVE MODE")
                    gate = asyncio.ensure_future(client.publish_batch([request("gate")]))
                    publishes.append(gate)
                    assert await crashing.expect("publishing") == ["gate"]  # taken alone
                    group = [
                        asyncio.ensure_future(client.publish_batch([request(k)]))
                        for k in group_keys
                    ]
                    publishes += group
                    queued: list[str] = []
                    while sorted(queued) != sorted(group_keys):
                        queued += await crashing.expect("queued")
                    await lock.rollback()  # the gate commits (2), then the group (3)
                finally:
                    await locker.close()

                second = await crashing.expect("committed")
                assert second[0] == "2"
                gate_id = pairs(second[1:])["gate"]
                publishing = await crashing.expect("publishing")
                assert sorted(publishing) == sorted(group_keys)  # one transaction, GROUP requests
                crash = await crashing.expect("crashing")
                assert await crashing.wait() == CRASH_EXIT, crashing.stderr()
                assert crash[0] == str(CRASH_AFTER)
                crashed = pairs(crash[1:])
                assert sorted(crashed) == sorted(group_keys)

                # -- the crash came after COMMIT and before any confirm -----------------------
                assert not any(t.done() for t in group)  # no confirm; the SDK waits to retry
                before = await stored(db)
                for k in group_keys:
                    assert before["messages"].get(k) == [crashed[k]], k  # committed, unconfirmed
                for k, r in zip(batch_keys, confirmed, strict=True):
                    assert before["messages"].get(k) == [r.message_id], k  # confirmed: kept

                # -- a normal broker on the same port; the SDK reconnects and retries ---------
                restart = write_config(
                    tmp_path / "restarted.toml",
                    dsn=pg_dsn,
                    tls=tls_material,
                    key_file=key_file,
                    port=port,
                    committers=3,
                )
                restarted = await BrokerProcess.start(
                    [*_securebroker_command(), "serve", "--config", str(restart)],
                    tmp_path / "restarted.stderr",
                )
                procs.append(restarted)
                retried = await restarted.while_running(asyncio.gather(*group), RETRY_FOR)
                assert [r for [r] in retried] == [
                    PublishResult(crashed[k], duplicate=True) for k in group_keys
                ]
                [gate_result] = await restarted.while_running(gate, IO_TIMEOUT)
                # confirmed before the crash, or retried after it: the same message either way
                assert gate_result.message_id == gate_id
                assert client.reconnects == 1

                # Explicit retries of everything, with the same keys: the original ids.
                ids = {
                    **{k: r.message_id for k, r in zip(batch_keys, confirmed, strict=True)},
                    "gate": gate_id,
                    **crashed,
                }
                again = await client.publish_batch([request(k) for k in all_keys])
                assert again == [PublishResult(ids[k], duplicate=True) for k in all_keys]

                # -- exactly one stored copy of each -----------------------------------------
                after = await stored(db)
                assert after["messages"] == {k: [ids[k]] for k in all_keys}
                assert after["claims"] == ids
                assert after["deliveries"] == Counter(ids.values())

                # -- a consumer receives each message exactly once ----------------------------
                subscription = client.consume(SUB, credit=len(all_keys))
                received: list[tuple[str | None, uuid.UUID, bytes]] = []
                async with asyncio.timeout(IO_TIMEOUT):
                    async for message in subscription:
                        received.append((message.idempotency_key, message.id, message.payload))
                        await message.ack()
                        if len(received) == len(all_keys):
                            break
                await subscription.close()
                assert Counter(received) == Counter((k, ids[k], payload(k)) for k in all_keys)
                assert (await stored(db))["deliveries"] == Counter()  # nothing left to deliver
            finally:
                for p in publishes:  # left pending only when the test failed
                    p.cancel()
                await client.close()
            assert await restarted.stop() == 0, restarted.stderr()
    finally:
        await db.close()
