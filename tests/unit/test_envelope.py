"""Envelope encryption without I/O: sealing, opening, scopes, rollover, rotation, shredding.

The keyring here is a small in-memory implementation of the ``Keyring`` port (the real providers
pass their own contract suite in ``tests/integration/test_keyring_contract.py``); the key store
is ``MemoryKeyStore``, the in-memory twin of ``sb_deks``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securebroker.crypto import admin
from securebroker.crypto.envelope import DESTROYED, OVERHEAD, UNREADABLE, Envelope
from securebroker.crypto.keyring import KekInfo, KekState, KeyringError, UnwrapError
from securebroker.crypto.keystore import MemoryKeyStore
from securebroker.errors import ValidationError


class MemoryKeyring:
    provider = "memory"

    def __init__(self) -> None:
        self.keys: dict[int, bytes | None] = {1: AESGCM.generate_key(bit_length=256)}
        self._primary = 1
        self.refreshes = 0

    def primary(self) -> int:
        return self._primary

    def versions(self) -> list[KekInfo]:
        now = datetime.now(UTC)
        return [
            KekInfo(
                v,
                KekState.PRIMARY
                if v == self._primary
                else KekState.RETIRED
                if k is None
                else KekState.ACTIVE,
                now,
            )
            for v, k in sorted(self.keys.items())
        ]

    def _key(self, version: int) -> AESGCM:
        key = self.keys.get(version)
        if key is None:
            raise UnwrapError(f"KEK version {version} is not available")
        return AESGCM(key)

    def wrap(self, version: int, dek: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._key(version).encrypt(nonce, dek, aad + version.to_bytes(4, "big"))

    def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        try:
            return self._key(version).decrypt(
                wrapped[:12], wrapped[12:], aad + version.to_bytes(4, "big")
            )
        except InvalidTag:
            raise UnwrapError("unwrap failed") from None

    def rotate(self) -> int:
        self._primary = max(self.keys) + 1
        self.keys[self._primary] = AESGCM.generate_key(bit_length=256)
        return self._primary

    def retire_below(self, version: int) -> list[int]:
        out = [v for v, k in self.keys.items() if v < version and k is not None]
        for v in out:
            self.keys[v] = None
        return out

    def refresh(self) -> None:
        self.refreshes += 1


@pytest.fixture
def keyring() -> MemoryKeyring:
    return MemoryKeyring()


@pytest.fixture
def store() -> MemoryKeyStore:
    return MemoryKeyStore()


def envelope(keyring: MemoryKeyring, store: MemoryKeyStore, **kw: object) -> Envelope:
    return Envelope(keyring, store, **kw)  # type: ignore[arg-type]


async def seal(env: Envelope, topic: str, payload: bytes, **attrs: str) -> tuple[uuid.UUID, bytes]:
    scope = env.scope_for(topic, attrs)
    await env.prepare([scope])
    mid = uuid.uuid4()
    return mid, env.seal(mid, topic, scope, payload)


async def test_round_trip_and_no_plaintext_at_rest(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    marker = b"PAN-4111111111111111-marker"
    mid, blob = await seal(env, "payments.card", marker)
    assert marker not in blob and len(blob) == len(marker) + OVERHEAD
    assert all(marker not in (d.wrapped or b"") for d in store.deks.values())
    fresh = envelope(keyring, store)  # another process: nothing cached, DEK from the store
    [opened] = await fresh.open_many([(mid, "payments.card", blob)])
    assert (opened.payload, opened.error) == (marker, None)


async def test_a_ciphertext_moved_to_another_row_does_not_open(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    a_id, a = await seal(env, "payments.card", b"message A")
    b_id, b = await seal(env, "payments.card", b"message B")
    swapped = await env.open_many([(a_id, "payments.card", b), (b_id, "payments.card", a)])
    assert [(o.payload, o.error) for o in swapped] == [(b"", UNREADABLE)] * 2
    other_topic = await env.open_many([(a_id, "payments.refund", a)])
    assert other_topic[0].error == UNREADABLE
    tampered = bytearray(a)
    tampered[-1] ^= 1
    assert (await env.open_many([(a_id, "payments.card", bytes(tampered))]))[0].error == UNREADABLE
    assert (await env.open_many([(a_id, "payments.card", b"short")]))[0].error == UNREADABLE
    # the originals still open
    assert (await env.open_many([(a_id, "payments.card", a)]))[0].payload == b"message A"


async def test_a_wrapped_dek_moved_to_another_scope_does_not_unwrap(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    await seal(env, "t", b"x")
    [dek] = store.deks.values()
    with pytest.raises(UnwrapError):
        keyring.unwrap(dek.kek_version, dek.wrapped or b"", b"securebroker/dek/v1\x00other")


async def test_scopes_by_topic_or_attribute(keyring: MemoryKeyring, store: MemoryKeyStore) -> None:
    env = envelope(keyring, store, scope_attribute="data_subject")
    assert env.scope_for("orders.eu", {}) == "topic:orders.eu"
    assert env.scope_for("orders.eu", {"data_subject": "cust-42"}) == "data_subject:cust-42"
    await seal(env, "orders.eu", b"1", data_subject="cust-42")
    await seal(env, "orders.us", b"2", data_subject="cust-42")
    await seal(env, "orders.us", b"3")
    assert sorted(d.scope for d in store.deks.values()) == [
        "data_subject:cust-42",
        "topic:orders.us",
    ]


async def test_rollover_by_count_keeps_old_messages_readable(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store, max_messages=3)
    sealed = [await seal(env, "t", f"m{i}".encode()) for i in range(7)]
    assert len(store.deks) == 3  # 3 + 3 + 1
    opened = await envelope(keyring, store).open_many([(m, "t", b) for m, b in sealed])
    assert [o.payload for o in opened] == [f"m{i}".encode() for i in range(7)]


async def test_rotation_moves_new_messages_to_the_new_kek(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    old = await seal(env, "t", b"before")
    await admin.rotate(keyring, store)
    assert store.events == ["rotate"]
    assert store.audited == ["key_rotated:v2"]
    assert env.ready(["topic:t"])  # not yet told
    env.on_event("rotate")
    assert not env.ready(["topic:t"])
    new = await seal(env, "t", b"after")
    assert sorted(d.kek_version for d in store.deks.values()) == [1, 2]
    # rewrap moves the old DEK to v2; then v1 can be retired and everything still opens
    assert await admin.rewrap(keyring, store) == 1
    assert await admin.rewrap(keyring, store) == 0  # resumable / idempotent
    assert await admin.retire(keyring, store, 2) == [1]
    fresh = envelope(keyring, store)
    opened = await fresh.open_many([(old[0], "t", old[1]), (new[0], "t", new[1])])
    assert [o.payload for o in opened] == [b"before", b"after"]


async def test_retire_refuses_while_deks_depend_on_old_versions(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    await seal(env, "t", b"x")
    await admin.rotate(keyring, store)
    with pytest.raises(ValidationError, match="1 data key\\(s\\) still depend"):
        await admin.retire(keyring, store, 2)
    with pytest.raises(ValidationError, match="would retire the primary"):
        await admin.retire(keyring, store, 3)
    assert keyring.keys[1] is not None


async def test_destroy_scope_shreds_it_and_spares_the_others(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    doomed = [await seal(env, "gdpr.cust42", f"secret {i}".encode()) for i in range(3)]
    kept = [await seal(env, "orders", f"order {i}".encode()) for i in range(3)]
    report = await admin.destroy_scope(keyring, store, "topic:gdpr.cust42")
    assert report.deks_destroyed == 1 and report.new_primary == 2 and report.retired == [1]
    assert store.events[0] == "destroy:topic:gdpr.cust42"
    env.on_event("destroy:topic:gdpr.cust42")  # what the NOTIFY does in a running broker
    for e in (env, envelope(keyring, store)):  # the running broker and a fresh one
        out = await e.open_many([(m, "gdpr.cust42", b) for m, b in doomed])
        assert {(o.payload, o.error) for o in out} == {(b"", DESTROYED)}
        out = await e.open_many([(m, "orders", b) for m, b in kept])
        assert [o.payload for o in out] == [f"order {i}".encode() for i in range(3)]
    # an old copy of the destroyed wrapped DEK (a backup, WAL) is useless: its KEK is gone
    assert keyring.keys[1] is None
    # the scope can be used again, with a new key (even before the broker heard of the
    # rotation: a retired primary makes it re-read the keyring)
    again = await seal(env, "gdpr.cust42", b"new")
    assert (await env.open_many([(again[0], "gdpr.cust42", again[1])]))[0].payload == b"new"


async def test_destroy_validates_the_scope(keyring: MemoryKeyring, store: MemoryKeyStore) -> None:
    with pytest.raises(ValidationError):
        await admin.destroy_scope(keyring, store, "orders")


async def test_unknown_dek_and_retired_kek_are_unreadable(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    mid, blob = await seal(env, "t", b"x")
    keyring.keys[1] = None  # the KEK is gone (retired without rewrap, by force)
    fresh = envelope(keyring, store)
    assert (await fresh.open_many([(mid, "t", blob)]))[0].error == UNREADABLE
    stranger = bytes((1,)) + uuid.uuid4().bytes + blob[17:]
    assert (await env.open_many([(mid, "t", stranger)]))[0].error == UNREADABLE


async def test_cache_is_bounded(keyring: MemoryKeyring, store: MemoryKeyStore) -> None:
    env = envelope(keyring, store, max_messages=1, cache_size=2)
    for i in range(5):
        await seal(env, "t", str(i).encode())
    assert len(env._cache) == 2


def test_nonce_limit_is_enforced(keyring: MemoryKeyring, store: MemoryKeyStore) -> None:
    with pytest.raises(ValueError, match="2\\^32"):
        envelope(keyring, store, max_messages=(1 << 32) + 1)


async def test_keyring_errors_never_carry_key_bytes(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    await seal(env, "t", b"x")
    [dek] = store.deks.values()
    with pytest.raises(KeyringError) as info:
        keyring.unwrap(1, (dek.wrapped or b"")[:-1] + b"\x00", b"aad")
    assert keyring.keys[1] is not None
    assert keyring.keys[1].hex() not in str(info.value)


async def test_rollover_by_age_and_cache_lifetime(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    now = [1000.0]
    env = envelope(
        keyring,
        store,
        max_age=timedelta(hours=1),
        cache_ttl=timedelta(minutes=5),
        monotonic=lambda: now[0],
    )
    first = await seal(env, "t", b"1")
    assert env.ready(["topic:t"])
    now[0] += 3599
    assert env.ready(["topic:t"])
    now[0] += 2
    assert not env.ready(["topic:t"])  # an hour old: the next publish gets a new DEK
    second = await seal(env, "t", b"2")
    assert len(store.deks) == 2
    # cached DEKs expire from memory and are fetched (and unwrapped) again when needed
    now[0] += 301
    ids = [blob[1:17] for _, blob in (first, second)]
    assert len(env._cache) == 2  # still held, but past their lifetime:
    assert [env._cached(i) for i in ids] == [None, None]
    opened = await env.open_many([(first[0], "t", first[1]), (second[0], "t", second[1])])
    assert [o.payload for o in opened] == [b"1", b"2"]


async def test_concurrent_first_publishes_share_one_new_dek(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    await asyncio.gather(*(env.prepare(["topic:t"]) for _ in range(50)))
    assert len(store.deks) == 1


async def test_nonces_are_a_per_dek_counter_and_reset_with_a_new_dek(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store, max_messages=3)
    blobs = [(await seal(env, "t", b"x"))[1] for _ in range(4)]
    nonces = [(uuid.UUID(bytes=b[1:17]), int.from_bytes(b[17:29], "big")) for b in blobs]
    first_dek = nonces[0][0]
    assert nonces[:3] == [(first_dek, 1), (first_dek, 2), (first_dek, 3)]
    assert nonces[3][0] != first_dek and nonces[3][1] == 1  # a new DEK starts again


def test_a_forked_child_drops_the_parents_active_deks(
    keyring: MemoryKeyring, store: MemoryKeyStore
) -> None:
    env = envelope(keyring, store)
    asyncio.run(env.prepare(["topic:t"]))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, b"1" if env.ready(["topic:t"]) else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"0"  # the child would have to make its own DEK (no shared counter)
    assert env.ready(["topic:t"])  # the parent keeps its own
