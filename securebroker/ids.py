"""Time-ordered message ids (UUIDv7, RFC 9562)."""

from __future__ import annotations

import os
import uuid
from datetime import datetime

_POOL_IDS = 4096
_pool = b""
_pos = 0


def _random10() -> bytes:
    """10 bytes from a buffer refilled from the OS CSPRNG 4,096 ids at a time (one syscall
    per 4,096 ids instead of one per id; still os.urandom-quality randomness)."""
    global _pool, _pos  # noqa: PLW0603 - a module-level buffer is the point
    if _pos >= len(_pool):
        _pool, _pos = os.urandom(10 * _POOL_IDS), 0
    out = _pool[_pos : _pos + 10]
    _pos += 10
    return out


def _reset_after_fork() -> None:
    global _pool, _pos
    _pool, _pos = b"", 0  # a forked child must never reuse its parent's random bytes


os.register_at_fork(after_in_child=_reset_after_fork)


def uuid7(when: datetime, rand: bytes | None = None) -> uuid.UUID:
    """A UUIDv7 whose first 48 bits are ``when`` in epoch milliseconds.

    Ids sort by creation time (good B-tree locality in the messages table) and the 74 random
    bits make collisions practically impossible across broker processes.
    """
    ms = int(when.timestamp() * 1000) & 0xFFFF_FFFF_FFFF
    tail = int.from_bytes(rand if rand is not None else _random10(), "big")
    rand_a = (tail >> 62) & 0x0FFF
    rand_b = tail & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)
