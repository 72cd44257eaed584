"""Time-ordered message ids (UUIDv7, RFC 9562)."""

from __future__ import annotations

import os
import uuid
from datetime import datetime


def uuid7(when: datetime, rand: bytes | None = None) -> uuid.UUID:
    """A UUIDv7 whose first 48 bits are ``when`` in epoch milliseconds.

    Ids sort by creation time (good B-tree locality in the messages table) and the 74 random
    bits make collisions practically impossible across broker processes.
    """
    ms = int(when.timestamp() * 1000) & 0xFFFF_FFFF_FFFF
    tail = int.from_bytes(rand if rand is not None else os.urandom(10), "big")
    rand_a = (tail >> 62) & 0x0FFF
    rand_b = tail & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)
