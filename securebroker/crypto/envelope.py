"""Envelope encryption of payloads: AES-256-GCM under scoped data keys wrapped by keyring KEKs.

Sealed payload (what ``sb_messages.payload`` holds)::

    0x01 | DEK id (16 bytes) | nonce (12 bytes) | ciphertext || GCM tag (16 bytes)

The AAD binds the ciphertext to the message id, the topic and the DEK id, so a ciphertext copied
into another row (another message, another topic) fails authentication instead of decrypting to
the wrong message. A wrapped DEK is bound to its id and scope the same way (AAD of the wrap).

**Scopes.** A DEK serves one scope: ``topic:<topic>`` by default, or ``<attr>:<value>`` when
``scope_attribute`` is set and the message carries that attribute (per tenant, per data
subject). Destroying a scope destroys its DEKs (crypto-shredding).

**DEK lifetime and nonces.** Each broker process seals with its own active DEK per scope,
created on first use and rolled over after ``max_messages`` seals (2^24 by default), after
``max_age``, or when the keyring's primary KEK changed (so new messages use the new KEK). A DEK
is used by exactly one process and never after a restart (nor in a forked child), so its nonces
are simply its seal counter (the deterministic construction of NIST SP 800-38D §8.2.1): unique
by construction, no randomness needed per message, and the count is exact without shared state.

**Cache.** Unwrapped DEKs for opening are kept in a bounded LRU with a lifetime; key events
(``NOTIFY sb_keys``) evict them at once. Key material is never logged, put in an error, or
written anywhere but (wrapped) ``sb_deks``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securebroker.clock import Clock, SystemClock
from securebroker.crypto.keyring import Keyring, KeyringError
from securebroker.crypto.keystore import KeyStore, StoredDek

log = logging.getLogger(__name__)

FORMAT = 0x01
HEADER = 1 + 16 + 12
OVERHEAD = HEADER + 16
#: payload_error values reported to consumers instead of bytes
DESTROYED = "payload_destroyed"
UNREADABLE = "payload_unreadable"


def message_aad(message_id: uuid.UUID, topic: str, dek_id: bytes) -> bytes:
    """``dek_id`` as its 16 raw bytes (as stored in the sealed payload)."""
    return b"securebroker/msg/v1\x00" + message_id.bytes + dek_id + topic.encode()


def dek_aad(dek_id: uuid.UUID, scope: str) -> bytes:
    return b"securebroker/dek/v1\x00" + dek_id.bytes + scope.encode()


#: every live Envelope, so a forked child can drop the parent's active DEKs (nonce counters)
_ENVELOPES: weakref.WeakSet[Envelope] = weakref.WeakSet()


def _forget_active_after_fork() -> None:
    for env in list(_ENVELOPES):
        env._active.clear()


os.register_at_fork(after_in_child=_forget_active_after_fork)
SCOPE_MEMO = 10_000


@dataclass(slots=True)
class _Active:
    id: uuid.UUID
    aead: AESGCM
    kek_version: int
    created: float
    seals: int = 0


@dataclass(frozen=True, slots=True)
class Opened:
    payload: bytes
    #: None, DESTROYED or UNREADABLE
    error: str | None = None


class Envelope:
    def __init__(
        self,
        keyring: Keyring,
        keys: KeyStore,
        *,
        scope_attribute: str = "",
        max_messages: int = 1 << 24,
        max_age: timedelta = timedelta(days=1),
        cache_size: int = 10_000,
        cache_ttl: timedelta = timedelta(minutes=5),
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= max_messages <= 1 << 32:
            raise ValueError("max_messages must be between 1 and 2^32 (AES-GCM nonce limit)")
        self.keyring = keyring
        self.keys = keys
        self.scope_attribute = scope_attribute
        self.max_messages = max_messages
        self.max_age = max_age.total_seconds()
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl.total_seconds()
        self.clock = clock or SystemClock()
        #: seconds, for DEK age and cache lifetimes (injectable, so tests need not wait)
        self._monotonic = monotonic
        self._active: dict[str, _Active] = {}
        #: dek id (16 raw bytes, as in sealed payloads) -> (aead, scope, expires at monotonic)
        self._cache: OrderedDict[bytes, tuple[AESGCM, str, float]] = OrderedDict()
        self._primary = keyring.primary()
        self._creating: dict[str, asyncio.Future[None]] = {}
        self._topic_scopes: dict[str, str] = {}
        _ENVELOPES.add(self)

    # -- scopes ----------------------------------------------------------------------------------
    def scope_for(self, topic: str, attributes: Mapping[str, str]) -> str:
        if self.scope_attribute:
            value = attributes.get(self.scope_attribute)
            if value:
                return f"{self.scope_attribute}:{value}"
        scope = self._topic_scopes.get(topic)
        if scope is None:  # memoized: this runs twice per published message
            if len(self._topic_scopes) >= SCOPE_MEMO:
                self._topic_scopes.clear()
            scope = self._topic_scopes[topic] = f"topic:{topic}"
        return scope

    # -- sealing ---------------------------------------------------------------------------------
    def ready(self, scopes: Iterable[str]) -> bool:
        """True when every scope has a usable active DEK, so ``seal`` needs no I/O."""
        now = self._monotonic()
        for scope in scopes:
            a = self._active.get(scope)
            if a is None or not self._usable(a, now):
                return False
        return True

    def _usable(self, a: _Active, now: float) -> bool:
        return (
            a.seals < self.max_messages
            and now - a.created < self.max_age
            and a.kek_version == self._primary
        )

    async def prepare(self, scopes: Iterable[str]) -> None:
        """Create (and persist, wrapped) a fresh DEK for each scope that needs one. Concurrent
        callers for one scope share one creation (no burst of DEKs when traffic starts)."""
        for scope in set(scopes):
            a = self._active.get(scope)
            if a is not None and self._usable(a, self._monotonic()):
                continue
            pending = self._creating.get(scope)
            if pending is None:
                pending = asyncio.ensure_future(self._create(scope, a))
                self._creating[scope] = pending
                pending.add_done_callback(functools.partial(self._created, scope))
            await asyncio.shield(pending)

    def _created(self, scope: str, _done: asyncio.Future[None]) -> None:
        self._creating.pop(scope, None)

    async def _create(self, scope: str, previous: _Active | None) -> None:
        dek_id = uuid.uuid4()
        key = AESGCM.generate_key(bit_length=256)
        try:
            wrapped = self.keyring.wrap(self._primary, key, dek_aad(dek_id, scope))
        except KeyringError:  # e.g. retired by an operator while we missed the event
            self.refresh()
            wrapped = self.keyring.wrap(self._primary, key, dek_aad(dek_id, scope))
        version = self._primary
        await self.keys.insert(StoredDek(dek_id, scope, version, wrapped), self.clock.now())
        aead = AESGCM(key)
        self._active[scope] = _Active(dek_id, aead, version, self._monotonic())
        self._remember(dek_id.bytes, aead, scope)
        if previous is not None:
            log.info("DEK rolled over for scope %s (%d seals)", scope, previous.seals)

    def seal(self, message_id: uuid.UUID, topic: str, scope: str, payload: bytes) -> bytes:
        a = self._active[scope]  # ``prepare`` made it; KeyError means a caller skipped it
        a.seals += 1
        nonce = a.seals.to_bytes(12, "big")  # unique per DEK by construction (see above)
        ct = a.aead.encrypt(nonce, payload, message_aad(message_id, topic, a.id.bytes))
        return bytes((FORMAT,)) + a.id.bytes + nonce + ct

    # -- opening ---------------------------------------------------------------------------------
    async def open_many(self, items: Sequence[tuple[uuid.UUID, str, bytes]]) -> list[Opened]:
        """Open ``(message_id, topic, sealed)`` triples; fetch missing DEKs in one query."""
        dek_keys = [_dek_key(blob) for _, _, blob in items]
        entries = {k: self._cached(k) for k in set(dek_keys) if k is not None}
        destroyed: set[bytes] = set()
        missing = [k for k, entry in entries.items() if entry is None]
        if missing:
            stored = await self.keys.get_many([uuid.UUID(bytes=k) for k in missing])
            for dek_id, dek in stored.items():
                did = dek_id.bytes
                if dek.wrapped is None:
                    destroyed.add(did)
                    continue
                try:
                    key = self.keyring.unwrap(
                        dek.kek_version, dek.wrapped, dek_aad(dek_id, dek.scope)
                    )
                except KeyringError as exc:
                    log.warning("DEK %s not unwrapped: %s", dek_id, exc.code)
                    continue
                entries[did] = self._remember(did, AESGCM(key), dek.scope)
        return [
            self._open_one(
                mid, topic, blob, None if did is None else entries.get(did), did in destroyed
            )
            for (mid, topic, blob), did in zip(items, dek_keys, strict=True)
        ]

    def _open_one(
        self,
        message_id: uuid.UUID,
        topic: str,
        blob: bytes,
        entry: tuple[AESGCM, str, float] | None,
        destroyed: bool,
    ) -> Opened:
        if destroyed:
            return Opened(b"", DESTROYED)
        if entry is None:  # not a sealed payload, unknown DEK, or its KEK is gone
            return Opened(b"", UNREADABLE)
        try:
            plain = entry[0].decrypt(
                blob[17:HEADER], blob[HEADER:], message_aad(message_id, topic, blob[1:17])
            )
        except InvalidTag:
            log.warning("payload of message %s failed authentication", message_id)
            return Opened(b"", UNREADABLE)
        return Opened(plain)

    def _cached(self, did: bytes) -> tuple[AESGCM, str, float] | None:
        entry = self._cache.get(did)
        if entry is None:
            return None
        if entry[2] < self._monotonic():
            del self._cache[did]
            return None
        self._cache.move_to_end(did)
        return entry

    def _remember(self, did: bytes, aead: AESGCM, scope: str) -> tuple[AESGCM, str, float]:
        entry = self._cache[did] = (aead, scope, self._monotonic() + self.cache_ttl)
        self._cache.move_to_end(did)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry

    # -- key events ------------------------------------------------------------------------------
    def on_event(self, event: str) -> None:
        """``rotate``: re-read the keyring (new DEKs use the new primary). ``destroy:<scope>``:
        forget that scope's DEKs at once. Anything else: forget everything (safe default)."""
        if event.startswith("destroy:"):
            scope = event.removeprefix("destroy:")
            self._active.pop(scope, None)
            for did in [d for d, (_, s, _) in self._cache.items() if s == scope]:
                del self._cache[did]
            log.info("keys of scope %s dropped from memory", scope)
            return
        self.refresh()
        if event != "rotate":
            self._active.clear()
            self._cache.clear()
            log.info("key caches cleared (%s)", event)

    def refresh(self) -> None:
        """Re-read the keyring; a new primary makes every scope roll to a new DEK under it."""
        self.keyring.refresh()
        primary = self.keyring.primary()
        if primary != self._primary:
            log.info("primary KEK is now version %d (was %d)", primary, self._primary)
        self._primary = primary

    @property
    def primary(self) -> int:
        return self._primary


def _dek_key(blob: bytes) -> bytes | None:
    """The DEK id of a sealed payload, as raw bytes (no UUID object on the hot path)."""
    if len(blob) < OVERHEAD or blob[0] != FORMAT:
        return None
    return blob[1:17]
