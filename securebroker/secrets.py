"""Small secret files (fingerprint key, later signing keys): created private, refused if not."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from securebroker.errors import ConfigError


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically to ``path`` with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_random_key(path: Path, nbytes: int = 32) -> Path:
    """Create a hex-encoded random key file if missing; leave an existing one alone."""
    if not path.exists():
        write_private(path, secrets.token_hex(nbytes).encode() + b"\n")
    return path


def check_private(path: Path, *, setting: str, hint: str = "") -> None:
    """Refuse a missing key file, or one that group or others may access."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{setting}: file not found: {path}{hint}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{setting}: {path} is accessible by other users; chmod 600 it")


def read_key(path: Path, *, setting: str, min_bytes: int = 16) -> bytes:
    """Read a hex key file; refuse one that group or others may read."""
    check_private(path, setting=setting)
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{setting}: {path} must hold a hex-encoded key") from None
    if len(key) < min_bytes:
        raise ConfigError(f"{setting}: key in {path} is shorter than {min_bytes} bytes")
    return key
