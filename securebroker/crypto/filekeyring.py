"""The file keyring: KEK versions in a local JSON file (development and single-host deployments).

File format (``format`` 1), written with mode 0600 and refused when group or others may access it::

    {"format": 1, "primary": 2, "versions": [
      {"version": 1, "state": "retired", "created_at": "2025-01-01T00:00:00+00:00"},
      {"version": 2, "state": "primary", "created_at": "2025-02-01T00:00:00+00:00",
       "key": "<base64 of 32 random bytes>"}]}

Exactly one version is ``primary`` and ``primary`` names it; ``active`` versions only unwrap;
``retired`` versions have no ``key`` (absent or null): their key material is gone from the file.

Wrapping is AES-256-GCM with a random 96-bit nonce; the output is ``nonce || ciphertext || tag``.
The AAD actually authenticated is a fixed domain label, the KEK version, then the caller's AAD,
so a wrapped DEK only unwraps under the version it was wrapped with, even if two versions ever
held the same key.

Concurrency: ``rotate``/``retire_below`` hold an exclusive ``flock`` on the sibling file
``<path>.lock`` around read-modify-write, re-read the file under the lock and replace it
atomically (temporary file, fsync, rename, fsync of the directory), so concurrent writers in
several processes never lose a version. Readers never lock: the rename is atomic. ``refresh``
reloads the file when its inode, size or mtime changed; ``wrap``/``unwrap`` of a version not yet
known refresh once on their own (another process may have rotated).

Key material in memory: the non-retired KEKs stay in process memory (inside ``AESGCM`` objects)
for the life of the keyring, as they must for a file provider; the raw bytes read from the file
are dropped after loading and Python cannot reliably zero them. Use the PKCS#11 provider when
KEKs must never be in the broker's memory. Error messages name the file, the version and the
problem, never key material.
"""

from __future__ import annotations

import binascii
import fcntl
import json
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securebroker.crypto.keyring import KekInfo, KekState, KeyringError, UnwrapError
from securebroker.errors import ConfigError
from securebroker.secrets import check_private, write_private

__all__ = ["FileKeyring", "exclusive_lock"]

FORMAT = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_FILE_BYTES = 1 << 20
MAX_VERSION = 2**32 - 1
_AAD_LABEL = b"securebroker/kek/file\x00"
_ENTRY_FIELDS = frozenset({"version", "state", "created_at", "key"})
_TOP_FIELDS = frozenset({"format", "primary", "versions"})


def bound_aad(version: int, aad: bytes) -> bytes:
    """The AAD the cipher authenticates: domain label, KEK version (u32), caller's AAD."""
    return _AAD_LABEL + struct.pack(">I", version) + aad


def check_wrap_args(version: object, dek: object, aad: object) -> None:
    """What every provider's ``wrap`` refuses before touching a key."""
    if not isinstance(dek, bytes) or not dek:
        raise KeyringError("wrap: the data key must be non-empty bytes")
    if not isinstance(aad, bytes):
        raise KeyringError("wrap: aad must be bytes")
    if not _valid_version(version):
        raise KeyringError(f"wrap: invalid KEK version {version!r}")


def _valid_version(version: object) -> bool:
    return type(version) is int and 1 <= version <= MAX_VERSION


@dataclass(frozen=True, slots=True)
class _Entry:
    version: int
    state: KekState
    created_at: datetime
    key: bytes | None  # None exactly when retired


@dataclass(frozen=True, slots=True)
class _Loaded:
    """One parse of the file, with key bytes: lives only during a load or a read-modify-write."""

    primary: int
    entries: dict[int, _Entry]
    signature: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class _State:
    """What the keyring serves from: swapped whole, so readers never see a half update."""

    primary: int
    infos: tuple[KekInfo, ...]
    ciphers: dict[int, AESGCM]  # non-retired versions only
    signature: tuple[int, int, int]


class FileKeyring:
    """A ``Keyring`` backed by a JSON file; see the module docstring for format and guarantees."""

    provider = "file"

    def __init__(self, path: Path, *, setting: str = "keyring file") -> None:
        """Load ``path``. ``setting`` names the configuration key in permission errors.

        Raises ``ConfigError`` when the file is missing or accessible by group/others and
        ``KeyringError`` when it is malformed.
        """
        self.path = Path(path)
        self._setting = setting
        self._mutex = threading.Lock()
        self._state = self._to_state(self._load())

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, *, setting: str = "keyring file") -> FileKeyring:
        """Create a new keyring file holding version 1 (primary, fresh random key).

        Refuses to overwrite an existing file (checked under the lock, so two concurrent
        ``create`` calls cannot both succeed).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with exclusive_lock(_lock_path(path)):
            if path.exists() or path.is_symlink():
                raise KeyringError(f"keyring file {path} already exists; refusing to overwrite it")
            entry = _Entry(1, KekState.PRIMARY, _now(), os.urandom(KEY_BYTES))
            _write(path, 1, {1: entry})
        return cls(path, setting=setting)

    # -- Keyring protocol -----------------------------------------------------------------

    def primary(self) -> int:
        """The version new DEKs are wrapped under (as of the last load or ``refresh``)."""
        return self._state.primary

    def versions(self) -> list[KekInfo]:
        """Every version in the file, oldest first, retired ones included."""
        return list(self._state.infos)

    def wrap(self, version: int, dek: bytes, aad: bytes) -> bytes:
        """AES-256-GCM under KEK ``version``: ``nonce(12) || ciphertext || tag(16)``."""
        check_wrap_args(version, dek, aad)
        cipher = self._cipher(version)
        if cipher is None:
            state = self._info_state(version)
            if state is None:
                raise KeyringError(f"unknown KEK version {version} in {self.path}")
            raise KeyringError(f"KEK version {version} is retired; it cannot wrap")
        nonce = os.urandom(NONCE_BYTES)
        return nonce + cipher.encrypt(nonce, dek, bound_aad(version, aad))

    def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        """Inverse of ``wrap``. Any mismatch raises ``UnwrapError`` with an opaque message (the
        specific reason is in ``detail``, for logs)."""
        if not _valid_version(version):
            raise UnwrapError("cannot unwrap data key: invalid KEK version", detail="version")
        message = f"cannot unwrap data key under KEK version {version}"
        if not isinstance(wrapped, bytes) or not isinstance(aad, bytes):
            raise UnwrapError(message, detail="wrapped key and aad must be bytes")
        cipher = self._cipher(version)
        if cipher is None:
            known = self._info_state(version) is not None
            raise UnwrapError(message, detail="retired version" if known else "unknown version")
        if len(wrapped) < NONCE_BYTES + TAG_BYTES + 1:
            raise UnwrapError(message, detail="wrapped key too short")
        try:
            return cipher.decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], bound_aad(version, aad)
            )
        except InvalidTag:
            raise UnwrapError(message, detail="authentication failed") from None

    def rotate(self) -> int:
        """Add version ``max + 1`` as primary; the previous primary becomes active."""
        with self._mutex, exclusive_lock(_lock_path(self.path)):
            loaded = self._load()
            new = max(loaded.entries) + 1
            if new > MAX_VERSION:
                raise KeyringError(f"keyring file {self.path}: no KEK version numbers left")
            entries = dict(loaded.entries)
            old = entries[loaded.primary]
            entries[old.version] = _Entry(old.version, KekState.ACTIVE, old.created_at, old.key)
            entries[new] = _Entry(new, KekState.PRIMARY, _now(), os.urandom(KEY_BYTES))
            self._state = self._to_state(self._store(new, entries))
            return new

    def retire_below(self, version: int) -> list[int]:
        """Retire every non-retired, non-primary version below ``version``: their key material is
        removed from the file. Refuses ``version`` above the primary."""
        if not _valid_version(version):
            raise KeyringError(f"retire_below: invalid KEK version {version!r}")
        with self._mutex, exclusive_lock(_lock_path(self.path)):
            loaded = self._load()
            if version > loaded.primary:
                raise KeyringError(
                    f"cannot retire KEK versions below {version}: version {loaded.primary} is the "
                    "primary and is never retired (rotate first)"
                )
            targets = [
                e.version
                for e in sorted(loaded.entries.values(), key=lambda e: e.version)
                if e.version < version
                and e.state is not KekState.RETIRED
                and e.version != loaded.primary
            ]
            if not targets:
                self._state = self._to_state(loaded)
                return []
            entries = dict(loaded.entries)
            for v in targets:
                entries[v] = _Entry(v, KekState.RETIRED, entries[v].created_at, None)
            self._state = self._to_state(self._store(loaded.primary, entries))
            return targets

    def refresh(self) -> None:
        """Reload the file if it changed (inode, size or mtime). On error the keyring keeps
        serving what it had and the error propagates."""
        with self._mutex:
            if _signature(self._stat()) != self._state.signature:
                self._state = self._to_state(self._load())

    # -- internals ------------------------------------------------------------------------

    def _cipher(self, version: int) -> AESGCM | None:
        cipher = self._state.ciphers.get(version)
        if cipher is None and self._info_state(version) is None:
            self.refresh()  # another process may have rotated since we loaded
            cipher = self._state.ciphers.get(version)
        return cipher

    def _info_state(self, version: int) -> KekState | None:
        for info in self._state.infos:
            if info.version == version:
                return info.state
        return None

    def _stat(self) -> os.stat_result:
        check_private(self.path, setting=self._setting)
        return self.path.stat()

    def _load(self) -> _Loaded:
        check_private(self.path, setting=self._setting)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise KeyringError(
                f"keyring file {self.path}: cannot open: {exc.strerror or exc}"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyringError(f"keyring file {self.path}: not a regular file")
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):  # changed since check_private
                raise ConfigError(
                    f"{self._setting}: {self.path} is accessible by other users; chmod 600 it"
                )
            if st.st_size > MAX_FILE_BYTES:
                raise KeyringError(f"keyring file {self.path}: larger than {MAX_FILE_BYTES} bytes")
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
        primary, entries = _parse(self.path, data)
        return _Loaded(primary, entries, _signature(st))

    def _store(self, primary: int, entries: dict[int, _Entry]) -> _Loaded:
        st = _write(self.path, primary, entries)
        return _Loaded(primary, entries, _signature(st))

    @staticmethod
    def _to_state(loaded: _Loaded) -> _State:
        ordered = sorted(loaded.entries.values(), key=lambda e: e.version)
        return _State(
            primary=loaded.primary,
            infos=tuple(KekInfo(e.version, e.state, e.created_at) for e in ordered),
            ciphers={e.version: AESGCM(e.key) for e in ordered if e.key is not None},
            signature=loaded.signature,
        )


# -- file helpers -------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory ``flock`` on ``lock_path`` (created 0600 if missing; symlinks and
    files owned by another user are refused), held until the block exits. Blocks while another
    process holds it: the holders are short read-modify-write sections."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KeyringError(
            f"keyring lock file {lock_path}: cannot open: {exc.strerror or exc}"
        ) from None
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise KeyringError(f"keyring lock file {lock_path} belongs to another user")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _write(path: Path, primary: int, entries: dict[int, _Entry]) -> os.stat_result:
    """Replace ``path`` atomically (0600, fsynced, then the directory fsynced)."""
    versions: list[dict[str, Any]] = []
    for e in sorted(entries.values(), key=lambda e: e.version):
        item: dict[str, Any] = {
            "version": e.version,
            "state": e.state.value,
            "created_at": e.created_at.isoformat(),
        }
        if e.key is not None:
            item["key"] = binascii.b2a_base64(e.key, newline=False).decode("ascii")
        versions.append(item)
    doc = {"format": FORMAT, "primary": primary, "versions": versions}
    write_private(path, (json.dumps(doc, indent=2) + "\n").encode("ascii"))
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path.stat()


def _parse(path: Path, data: bytes) -> tuple[int, dict[int, _Entry]]:
    """Validate the whole document; every problem is a ``KeyringError`` naming the file and the
    field, never echoing key material."""

    def bad(problem: str) -> KeyringError:
        return KeyringError(f"keyring file {path}: {problem}")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise bad("top level must be a JSON object")
    unknown = set(doc) - _TOP_FIELDS
    if unknown:
        raise bad(f"unknown top-level field(s): {', '.join(sorted(map(str, unknown)))}")
    if "format" not in doc:
        raise bad("missing 'format'")
    if type(doc["format"]) is not int or doc["format"] != FORMAT:
        raise bad(f"unsupported format (expected {FORMAT})")
    if "primary" not in doc:
        raise bad("missing 'primary'")
    primary = doc["primary"]
    if not _valid_version(primary):
        raise bad("'primary' must be a positive integer version")
    raw_versions = doc.get("versions")
    if not isinstance(raw_versions, list) or not raw_versions:
        raise bad("'versions' must be a non-empty list")
    entries: dict[int, _Entry] = {}
    for index, raw in enumerate(raw_versions):
        entry = _parse_entry(raw, index, bad)
        if entry.version in entries:
            raise bad(f"duplicate version {entry.version}")
        entries[entry.version] = entry
    primaries = sorted(e.version for e in entries.values() if e.state is KekState.PRIMARY)
    if primary not in entries:
        raise bad(f"primary version {primary} is not among the versions")
    if entries[primary].state is not KekState.PRIMARY:
        raise bad(f"primary version {primary} has state '{entries[primary].state.value}'")
    if primaries != [primary]:
        raise bad(f"more than one version has state 'primary': {primaries}")
    return primary, entries


def _parse_entry(raw: object, index: int, bad: Callable[[str], KeyringError]) -> _Entry:
    where = f"versions[{index}]"
    if not isinstance(raw, dict):
        raise bad(f"{where} must be an object")
    unknown = set(raw) - _ENTRY_FIELDS
    if unknown:
        raise bad(f"{where}: unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    version = raw.get("version")
    if not _valid_version(version):
        raise bad(f"{where}: 'version' must be a positive integer")
    assert isinstance(version, int)
    where = f"version {version}"
    state_raw = raw.get("state")
    try:
        state = KekState(state_raw if isinstance(state_raw, str) else "")
    except ValueError:
        raise bad(f"{where}: 'state' must be one of primary, active, retired") from None
    created_raw = raw.get("created_at")
    if not isinstance(created_raw, str):
        raise bad(f"{where}: 'created_at' must be an ISO 8601 timestamp")
    try:
        created_at = datetime.fromisoformat(created_raw)
    except ValueError:
        raise bad(f"{where}: 'created_at' is not an ISO 8601 timestamp") from None
    if created_at.tzinfo is None:
        raise bad(f"{where}: 'created_at' must include a UTC offset")
    key_raw = raw.get("key")
    if state is KekState.RETIRED:
        if key_raw is not None:
            raise bad(f"{where}: retired but still holds key material; remove its 'key'")
        return _Entry(version, state, created_at, None)
    if not isinstance(key_raw, str):
        raise bad(f"{where}: missing 'key' (base64 of {KEY_BYTES} bytes)")
    try:
        key = binascii.a2b_base64(key_raw.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise bad(f"{where}: 'key' is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise bad(f"{where}: 'key' must be {KEY_BYTES} bytes, found {len(key)}")
    return _Entry(version, state, created_at, key)
