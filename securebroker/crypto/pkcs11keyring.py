"""The PKCS#11 keyring: KEKs generated and used inside an HSM (tested against SoftHSM2).

Needs the optional dependency ``python-pkcs11`` >= 0.9 (``pip install 'securebroker[hsm]'``);
it is imported only when a ``Pkcs11Keyring`` is built, so the package works without it.

Objects on the token (token objects, private: visible only after login)
------------------------------------------------------------------------
Everything the keyring knows lives in the token, none of it in the database. For each KEK
version ``N`` there are two objects, both labelled ``f"{label_prefix}-v{N}"``:

* the **key**: an AES-256 secret key generated inside the token (``CKA_SENSITIVE``, not
  ``CKA_EXTRACTABLE``, not copyable or modifiable, ``CKA_ENCRYPT``/``CKA_DECRYPT`` only) with a
  random 16-byte ``CKA_ID``;
* its **record**: a data object (``CKO_DATA``, ``CKA_APPLICATION`` = ``securebroker-kek``) whose
  value is JSON ``{"format": 1, "version": N, "key_id": "<hex CKA_ID>", "created_at": iso,
  "retired_at": iso | null}``.

The rest is derived on every read, so there is no shared mutable metadata to lose updates on:

* a version exists when it has a record; it is *live* when no record of it says retired and a
  key object with a recorded ``CKA_ID`` exists; otherwise it is *retired*;
* the primary is the highest live version; the other live versions are *active*;
* a key object without a record is an *orphan* (a rotation that crashed between generating the
  key and writing the record, or that lost a race). It is never used, and never destroyed
  automatically either (a read that missed a record must not destroy a live key).

``rotate``: under a host-local lock (``lock_path``, ``flock``; serialises the broker, the CLI
and anything else on this host), read the token, pick ``N = highest + 1`` over records *and*
key labels, generate the key, then look for any *other* key or record labelled ``-vN``: if one
exists (a process on another host is creating ``N`` too) destroy ours and start again. Only then
write the record: that is what makes the version usable. Should two hosts still both claim
``N`` (a token whose object search lags), the version simply has two recorded keys: ``wrap``
uses the one with the lowest ``CKA_ID``, ``unwrap`` tries each, ``retire_below`` destroys both,
so nothing wrapped under either is lost. Every failure fails closed: a rotation that cannot
complete leaves at most an orphan and raises ``KeyringError``, and retrying is safe. (SoftHSM2
2.6 has known races when several processes write one token while others read it: there, an
occasional ``rotate`` fails this way and must be repeated.)

Records are immutable on many tokens (SoftHSM2 refuses to modify a data object's
``CKA_VALUE``), so ``retire_below`` writes a *new* record with ``retired_at``, destroys the key
objects, then the superseded records; records of one version are merged on read.

Wrapping is ``CKM_AES_GCM`` inside the token with a random 96-bit IV from ``os.urandom``
(tokens that insist on generating GCM IVs themselves are not supported): output
``iv || ciphertext || tag``. The AAD given to the token is a domain label, the version (u32)
and the caller's AAD, as in the file provider.

Sessions: PKCS#11 login state is per process and token, and ``C_Logout`` ends it for every
session, so all ``Pkcs11Keyring`` objects of one process on the same module and token share one
logged-in read-write session (reference counted, closed by the last ``close()``); every call
holds that session's lock, so the keyring is safe to use from several threads. A second keyring
in the process must present the same PIN (compared in constant time, since the token would not
ask). A session or object handle that went stale (token removed, another process retired a
version) is reopened or re-read once. The PIN is kept in memory to reconnect; it never appears
in messages or ``repr``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from securebroker.crypto.filekeyring import check_wrap_args, exclusive_lock
from securebroker.crypto.keyring import KekInfo, KekState, KeyringError, UnwrapError

if TYPE_CHECKING:
    from pkcs11 import Object, Session

__all__ = ["Pkcs11Keyring"]

APPLICATION = "securebroker-kek"
RECORD_FORMAT = 1
KEY_ID_BYTES = 16
IV_BYTES = 12
TAG_BITS = 128
MAX_VERSION = 2**32 - 1
_AAD_LABEL = b"securebroker/kek/pkcs11\x00"
_ROTATE_ATTEMPTS = 5
_SCAN_ATTEMPTS = 5
_T = TypeVar("_T")


def bound_aad(version: int, aad: bytes) -> bytes:
    """The AAD the token authenticates: domain label, KEK version (u32), caller's AAD."""
    return _AAD_LABEL + struct.pack(">I", version) + aad


def default_lock_path(module: str, token_label: str, label_prefix: str) -> Path:
    """The host-local lock serialising rotations of one keyring: in the temporary directory,
    named after the user, module, token and prefix."""
    ident = "\0".join((os.path.realpath(module), token_label, label_prefix))
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"securebroker-kek-{os.geteuid()}-{digest}.lock"


def _valid_version(version: object) -> bool:
    return type(version) is int and 1 <= version <= MAX_VERSION


def _require_pkcs11() -> None:
    try:
        import pkcs11  # noqa: F401, PLC0415
    except ImportError:
        raise KeyringError(
            "the pkcs11 keyring needs python-pkcs11: pip install 'securebroker[hsm]'"
        ) from None


# -- shared sessions ------------------------------------------------------------------------


@dataclass(eq=False)
class _Shared:
    """One logged-in session per (module, token) in this process; see the module docstring."""

    module: str
    token_label: str
    pin: str
    session: Session
    lock: threading.RLock = field(default_factory=threading.RLock)
    refs: int = 0
    generation: int = 0  # bumped on every reopen: object handles must be re-read


_REGISTRY: dict[tuple[str, str], _Shared] = {}
_REGISTRY_LOCK = threading.Lock()


def _open_session(module: str, token_label: str, pin: str) -> Session:
    import pkcs11  # noqa: PLC0415
    from pkcs11 import exceptions as p11e  # noqa: PLC0415

    where = f"PKCS#11 token '{token_label}' ({module})"
    try:
        lib = pkcs11.lib(module)
    except p11e.PKCS11Error:
        raise KeyringError(f"cannot load PKCS#11 module {module}") from None
    try:
        token = lib.get_token(token_label=token_label)
    except p11e.NoSuchToken:
        raise KeyringError(f"{where}: no such token (was it initialised?)") from None
    except p11e.MultipleTokensReturned:
        raise KeyringError(f"{where}: more than one token has this label") from None
    except p11e.PKCS11Error as exc:
        raise KeyringError(f"{where}: cannot list tokens ({type(exc).__name__})") from None
    try:
        return token.open(rw=True, user_pin=pin)
    except p11e.UserAlreadyLoggedIn:
        pass  # this process logged in already (outside our registry): sessions share it
    except (
        p11e.PinIncorrect,
        p11e.PinInvalid,
        p11e.PinLenRange,
        p11e.PinExpired,
        p11e.PinLocked,
    ) as exc:
        raise KeyringError(f"{where}: PIN rejected ({type(exc).__name__})") from None
    except p11e.PKCS11Error as exc:
        raise KeyringError(f"{where}: cannot open a session ({type(exc).__name__})") from None
    try:
        return token.open(rw=True)
    except p11e.PKCS11Error as exc:
        raise KeyringError(f"{where}: cannot open a session ({type(exc).__name__})") from None


def _acquire(module: str, token_label: str, pin: str) -> _Shared:
    with _REGISTRY_LOCK:
        key = (os.path.realpath(module), token_label)  # one login per library and token
        shared = _REGISTRY.get(key)
        if shared is None:
            shared = _Shared(module, token_label, pin, _open_session(module, token_label, pin))
            _REGISTRY[key] = shared
        elif not hmac.compare_digest(pin.encode(), shared.pin.encode()):
            # the token would not ask again (login is per process): check it ourselves
            raise KeyringError(f"PKCS#11 token '{token_label}' ({module}): PIN rejected")
        shared.refs += 1
        return shared


def _release(shared: _Shared) -> None:
    from pkcs11 import exceptions as p11e  # noqa: PLC0415

    with _REGISTRY_LOCK:
        shared.refs -= 1
        if shared.refs > 0:
            return
        key = (os.path.realpath(shared.module), shared.token_label)
        if _REGISTRY.get(key) is shared:
            del _REGISTRY[key]
        # closing logs out if this session logged in; it may be gone already (token removed,
        # library finalised)
        with shared.lock, contextlib.suppress(p11e.PKCS11Error):
            shared.session.close()


# -- token state ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Record:
    version: int
    key_ids: frozenset[bytes]  # normally one; more only if two hosts claimed the version
    created_at: datetime
    retired: bool


@dataclass(frozen=True, slots=True)
class _State:
    infos: tuple[KekInfo, ...]
    primary: int | None
    keys: dict[int, list[Object]]  # live versions: their recorded keys, lowest CKA_ID first
    records: dict[int, _Record]
    record_objects: dict[int, list[Object]]
    key_objects: dict[int, list[Object]]  # every secret key carrying one of our labels
    highest: int  # over records and key labels: the next version is highest + 1
    generation: int


class Pkcs11Keyring:
    """A ``Keyring`` whose KEKs live in a PKCS#11 token; see the module docstring."""

    provider = "pkcs11"

    def __init__(
        self,
        module: str,
        token_label: str,
        pin: str,
        label_prefix: str = "securebroker-kek",
        *,
        lock_path: Path | None = None,
    ) -> None:
        """Open (or share) a logged-in session on the token and read its KEKs. Raises
        ``KeyringError`` if the token holds no usable KEK yet (see ``initialise``).

        ``lock_path`` is the host-local lock for ``rotate``/``retire_below`` (default:
        ``default_lock_path(...)`` in the temporary directory).
        """
        self._setup(module, token_label, pin, label_prefix, lock_path)
        try:
            with self._locked():
                self._state = self._read_state()
                if self._state.primary is None:
                    raise KeyringError(
                        f"{self._where}: no usable KEK labelled '{label_prefix}-v<N>'; create "
                        "the first version with Pkcs11Keyring.initialise"
                    )
        except BaseException:
            self.close()
            raise

    @classmethod
    def initialise(
        cls,
        module: str,
        token_label: str,
        pin: str,
        label_prefix: str = "securebroker-kek",
        *,
        lock_path: Path | None = None,
    ) -> Pkcs11Keyring:
        """Open the token like the constructor, first generating a KEK version if the token
        holds no usable one (version 1 on a fresh token). Idempotent."""
        self = cls.__new__(cls)
        self._setup(module, token_label, pin, label_prefix, lock_path)
        try:
            with self._locked(), exclusive_lock(self.lock_path):
                self._state = self._read_state()
                if self._state.primary is None:
                    self._rotate_locked()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(
        self, module: str, token_label: str, pin: str, label_prefix: str, lock_path: Path | None
    ) -> None:
        self._shared: _Shared | None = None
        self._where = f"PKCS#11 token '{token_label}'"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", label_prefix):
            raise KeyringError(
                f"invalid KEK label prefix {label_prefix!r}: use 1-64 letters, digits, '.', "
                "'_' or '-'"
            )
        _require_pkcs11()
        self.module = module
        self.token_label = token_label
        self.label_prefix = label_prefix
        self.lock_path = lock_path or default_lock_path(module, token_label, label_prefix)
        self._label_re = re.compile(re.escape(label_prefix) + r"-v([1-9][0-9]{0,9})")
        self._shared = _acquire(module, token_label, pin)

    def close(self) -> None:
        """Release this keyring's share of the session (the last one logs out). Idempotent."""
        shared, self._shared = self._shared, None
        if shared is not None:
            _release(shared)

    def __enter__(self) -> Pkcs11Keyring:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Pkcs11Keyring(module={self.module!r}, token_label={self.token_label!r}, "
            f"label_prefix={self.label_prefix!r})"
        )

    # -- Keyring protocol -----------------------------------------------------------------

    def primary(self) -> int:
        """The highest live version, as of the last read of the token (no I/O)."""
        primary = self._state.primary
        if primary is None:
            raise KeyringError(f"{self._where}: no usable KEK (all versions destroyed?)")
        return primary

    def versions(self) -> list[KekInfo]:
        """Every recorded version, oldest first, retired ones included (no I/O)."""
        return list(self._state.infos)

    def wrap(self, version: int, dek: bytes, aad: bytes) -> bytes:
        """AES-256-GCM inside the token under KEK ``version``: ``iv(12) || ciphertext || tag``."""
        import pkcs11  # noqa: PLC0415

        check_wrap_args(version, dek, aad)
        iv = os.urandom(IV_BYTES)
        param = pkcs11.GCMParams(iv, bound_aad(version, aad), TAG_BITS)

        def op(key: Object) -> bytes:
            assert isinstance(key, pkcs11.types.EncryptMixin)
            out = key.encrypt(dek, mechanism=pkcs11.Mechanism.AES_GCM, mechanism_param=param)
            return iv + _as_bytes(out)

        try:
            return self._with_keys(version, op, every=False)
        except _Missing as missing:
            raise KeyringError(f"{self._where}: KEK version {version} is {missing}") from None
        except _Failed as failed:
            raise KeyringError(
                f"{self._where}: wrapping under KEK version {version} failed", detail=str(failed)
            ) from None

    def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        """Inverse of ``wrap``, inside the token. Any mismatch raises ``UnwrapError`` with an
        opaque message (the specific reason is in ``detail``, for logs)."""
        import pkcs11  # noqa: PLC0415

        if not _valid_version(version):
            raise UnwrapError("cannot unwrap data key: invalid KEK version", detail="version")
        message = f"cannot unwrap data key under KEK version {version}"
        if not isinstance(wrapped, bytes) or not isinstance(aad, bytes):
            raise UnwrapError(message, detail="wrapped key and aad must be bytes")
        if len(wrapped) < IV_BYTES + TAG_BITS // 8 + 1:
            raise UnwrapError(message, detail="wrapped key too short")
        param = pkcs11.GCMParams(wrapped[:IV_BYTES], bound_aad(version, aad), TAG_BITS)
        body = wrapped[IV_BYTES:]

        def op(key: Object) -> bytes:
            assert isinstance(key, pkcs11.types.DecryptMixin)
            out = key.decrypt(body, mechanism=pkcs11.Mechanism.AES_GCM, mechanism_param=param)
            return _as_bytes(out)

        try:
            return self._with_keys(version, op, every=True)
        except _Missing as missing:
            raise UnwrapError(message, detail=f"{missing} version") from None
        except _Failed as failed:
            raise UnwrapError(message, detail=f"token refused: {failed}") from None

    def rotate(self) -> int:
        """Generate a new version inside the token and make it primary (it is the highest)."""
        with self._locked(), exclusive_lock(self.lock_path):
            return self._rotate_locked()

    def retire_below(self, version: int) -> list[int]:
        """Destroy the key objects of every active version below ``version``; their records
        stay, marked retired. Refuses ``version`` above the primary."""
        if not _valid_version(version):
            raise KeyringError(f"retire_below: invalid KEK version {version!r}")
        with self._locked(), exclusive_lock(self.lock_path):
            state = self._read_state()
            if state.primary is None:
                raise KeyringError(f"{self._where}: no usable KEK")
            if version > state.primary:
                raise KeyringError(
                    f"cannot retire KEK versions below {version}: version {state.primary} is "
                    "the primary and is never retired (rotate first)"
                )
            targets = [
                info.version
                for info in state.infos
                if info.version < version and info.state is KekState.ACTIVE
            ]
            session = self._session()
            now = _now()
            # 1. record the decision: from here on the version is retired, whatever follows
            for v in targets:
                self._create_record(session, state.records[v], retired_at=now)
            # 2. destroy the key material (also left-overs of versions recorded as retired
            #    whose destruction was interrupted; never unrecorded "orphans", see above)
            for v, objects in state.key_objects.items():
                record = state.records.get(v)
                if v in targets or (v < version and record is not None and record.retired):
                    for obj in objects:
                        _destroy_quietly(obj)
            # 3. drop the superseded (not retired) records
            for v in targets:
                for obj in state.record_objects.get(v, []):
                    if not _record_says_retired(obj):
                        _destroy_quietly(obj)
            self._state = self._read_state()
            return targets

    def refresh(self) -> None:
        """Re-read versions and records from the token (another process may have rotated)."""
        with self._locked():
            self._state = self._read_state()

    # -- internals ------------------------------------------------------------------------

    def _locked(self) -> threading.RLock:
        if self._shared is None:
            raise KeyringError(f"{self._where}: keyring is closed")
        return self._shared.lock

    def _session(self) -> Session:
        if self._shared is None:
            raise KeyringError(f"{self._where}: keyring is closed")
        return self._shared.session

    def _with_keys(self, version: int, op: Callable[[Object], _T], *, every: bool) -> _T:
        """Run ``op`` with the live key of ``version`` (``every``: each recorded key in turn
        until one succeeds). Re-reads the token once when the version is unknown or a handle
        went stale. Raises ``_Missing`` or ``_Failed``."""
        from pkcs11 import exceptions as p11e  # noqa: PLC0415

        session_gone = (
            p11e.SessionHandleInvalid,
            p11e.SessionClosed,
            p11e.DeviceRemoved,
            p11e.TokenNotPresent,
            p11e.UserNotLoggedIn,
        )
        stale = (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid, *session_gone)
        with self._locked():
            assert self._shared is not None
            if self._state.generation != self._shared.generation:
                self._state = self._read_state()
            for attempt in (1, 2):
                candidates = self._state.keys.get(version, [])
                if not candidates:
                    if attempt == 1 and version not in self._state.records:
                        self._state = self._read_state()  # another process may have rotated
                        continue
                    raise _Missing("retired" if version in self._state.records else "unknown")
                refused = "no key"
                try:
                    for key in candidates if every else candidates[:1]:
                        try:
                            return op(key)
                        except stale:
                            raise
                        except p11e.PKCS11Error as exc:
                            refused = type(exc).__name__
                except stale as exc:
                    if attempt == 2:
                        raise _Failed(type(exc).__name__) from None
                    if isinstance(exc, session_gone):
                        self._reopen()
                    self._state = self._read_state()
                    continue
                raise _Failed(refused)
            raise _Missing("unknown")

    def _reopen(self) -> None:
        from pkcs11 import exceptions as p11e  # noqa: PLC0415

        shared = self._shared
        assert shared is not None
        with contextlib.suppress(p11e.PKCS11Error):
            shared.session.close()
        shared.session = _open_session(shared.module, shared.token_label, shared.pin)
        shared.generation += 1

    def _rotate_locked(self) -> int:
        for _ in range(_ROTATE_ATTEMPTS):
            state = self._read_state()
            version = state.highest + 1
            if version > MAX_VERSION:
                raise KeyringError(f"{self._where}: no KEK version numbers left")
            if self._create_version(version):
                self._state = self._read_state()
                return version
        raise KeyringError(
            f"{self._where}: could not create a new KEK version: other processes created the "
            "same version each time; try again"
        )

    def _create_version(self, version: int) -> bool:
        """Generate the key for ``version``; claim it with a record unless another process is
        creating the same version (then destroy ours and return False)."""
        from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass  # noqa: PLC0415
        from pkcs11 import exceptions as p11e  # noqa: PLC0415

        session = self._session()
        label = self._label(version)
        key_id = os.urandom(KEY_ID_BYTES)
        try:
            key = session.generate_key(
                KeyType.AES,
                256,
                id=key_id,
                label=label,
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.MODIFIABLE: False,
                    Attribute.COPYABLE: False,
                },
            )
        except p11e.PKCS11Error as exc:
            raise KeyringError(
                f"{self._where}: generating KEK version {version} failed ({type(exc).__name__})"
            ) from None
        try:
            seen = key.get_attributes(
                [Attribute.LABEL, Attribute.ID, Attribute.SENSITIVE, Attribute.EXTRACTABLE]
            )
            if seen.get(Attribute.LABEL) != label or seen.get(Attribute.ID) != key_id:
                # The token cannot even show the object it just made (SoftHSM2 2.6 under
                # concurrent use by several processes): abandon it and try again.
                _destroy_quietly(key)
                return False
            if seen.get(Attribute.SENSITIVE) is not True or seen.get(Attribute.EXTRACTABLE):
                raise KeyringError(
                    f"{self._where}: the token made KEK version {version} extractable; refusing"
                )
            # Another host creating the same version, or (after a stale read) a version that
            # exists already: yield. Of two contenders the later one sees the other's key.
            rival_keys = [
                obj
                for obj in session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
                )
                if _attribute(obj, Attribute.ID) not in (key_id, None)  # None: it yielded
            ]
            records = list(
                session.get_objects(
                    {
                        Attribute.CLASS: ObjectClass.DATA,
                        Attribute.APPLICATION: APPLICATION,
                        Attribute.LABEL: label,
                    }
                )
            )
            if rival_keys or records:
                _destroy_quietly(key)
                return False
            record = _Record(version, frozenset([key_id]), _now(), retired=False)
            self._create_record(session, record, retired_at=None)
        except p11e.PKCS11Error as exc:
            _destroy_quietly(key)
            raise KeyringError(
                f"{self._where}: creating KEK version {version} failed ({type(exc).__name__})"
            ) from None
        except BaseException:
            _destroy_quietly(key)
            raise
        return True

    def _create_record(
        self, session: Session, record: _Record, *, retired_at: datetime | None
    ) -> None:
        from pkcs11 import Attribute, ObjectClass  # noqa: PLC0415
        from pkcs11 import exceptions as p11e  # noqa: PLC0415

        value = {
            "format": RECORD_FORMAT,
            "version": record.version,
            "key_id": min(record.key_ids).hex(),
            "created_at": record.created_at.isoformat(),
            "retired_at": retired_at.isoformat() if retired_at is not None else None,
        }
        try:
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.MODIFIABLE: False,
                    Attribute.LABEL: self._label(record.version),
                    Attribute.APPLICATION: APPLICATION,
                    Attribute.VALUE: json.dumps(value, separators=(",", ":")).encode("ascii"),
                }
            )
        except p11e.PKCS11Error as exc:
            raise KeyringError(
                f"{self._where}: writing the record of KEK version {record.version} failed "
                f"({type(exc).__name__})"
            ) from None

    def _label(self, version: int) -> str:
        return f"{self.label_prefix}-v{version}"

    def _version_of(self, label: object) -> int | None:
        if not isinstance(label, str):
            return None
        match = self._label_re.fullmatch(label)
        if match is None:
            return None
        version = int(match.group(1))
        return version if version <= MAX_VERSION else None

    def _read_state(self) -> _State:
        """Scan the token. An object destroyed mid-scan (another process retiring a version or
        abandoning a contended one) restarts the scan, a few times at most."""
        from pkcs11 import exceptions as p11e  # noqa: PLC0415

        for _ in range(_SCAN_ATTEMPTS):
            try:
                return self._scan()
            except p11e.ObjectHandleInvalid:
                continue
            except p11e.PKCS11Error as exc:
                raise KeyringError(
                    f"{self._where}: reading KEK objects failed ({type(exc).__name__})"
                ) from None
        raise KeyringError(f"{self._where}: KEK objects kept changing while being read; retry")

    def _scan(self) -> _State:
        from pkcs11 import Attribute, ObjectClass, SecretKey  # noqa: PLC0415

        assert self._shared is not None
        session = self._session()
        record_objects: dict[int, list[Object]] = {}
        records: dict[int, _Record] = {}
        for obj in session.get_objects(
            {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: APPLICATION}
        ):
            label = obj[Attribute.LABEL]
            version = self._version_of(label)
            if version is None:
                continue
            record = self._parse_record(label, version, obj[Attribute.VALUE])
            record_objects.setdefault(version, []).append(obj)
            records[version] = _merge(records.get(version), record)
        key_objects: dict[int, list[Object]] = {}
        live: dict[int, list[tuple[bytes, Object]]] = {}
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            version = self._version_of(obj[Attribute.LABEL])
            if version is None:
                continue
            key_objects.setdefault(version, []).append(obj)
            rec = records.get(version)
            key_id = obj[Attribute.ID]
            if (
                rec is not None
                and not rec.retired
                and isinstance(obj, SecretKey)
                and key_id in rec.key_ids
            ):
                live.setdefault(version, []).append((key_id, obj))
        keys = {
            v: [obj for _, obj in sorted(pairs, key=lambda p: p[0])] for v, pairs in live.items()
        }
        primary = max(keys, default=None)
        infos = tuple(
            KekInfo(
                v,
                KekState.PRIMARY
                if v == primary
                else KekState.ACTIVE
                if v in keys
                else KekState.RETIRED,
                records[v].created_at,
            )
            for v in sorted(records)
        )
        return _State(
            infos=infos,
            primary=primary,
            keys=keys,
            records=records,
            record_objects=record_objects,
            key_objects=key_objects,
            highest=max([*records, *key_objects], default=0),
            generation=self._shared.generation,
        )

    def _parse_record(self, label: str, version: int, raw: object) -> _Record:
        def bad(problem: str) -> KeyringError:
            return KeyringError(f"{self._where}: record object '{label}' is malformed: {problem}")

        if not isinstance(raw, bytes):
            raise bad("no value")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
            raise bad(f"expected a format {RECORD_FORMAT} object")
        if doc.get("version") != version:
            raise bad("its version does not match its label")
        try:
            key_id = bytes.fromhex(doc["key_id"])
            created_at = datetime.fromisoformat(doc["created_at"])
            retired_raw = doc.get("retired_at")
            if retired_raw is not None:
                datetime.fromisoformat(retired_raw)
        except (KeyError, TypeError, ValueError):
            raise bad("key_id, created_at or retired_at missing or invalid") from None
        if len(key_id) != KEY_ID_BYTES or created_at.tzinfo is None:
            raise bad("key_id or created_at invalid")
        return _Record(version, frozenset([key_id]), created_at, retired_raw is not None)


class _Missing(Exception):
    """Internal signal: the version is "unknown" or "retired"."""


class _Failed(Exception):
    """Internal signal: the token refused the operation (the PKCS#11 error name)."""


def _merge(old: _Record | None, new: _Record) -> _Record:
    """Records of one version: every recorded key, the earliest creation, retired if any
    record says so."""
    if old is None:
        return new
    return _Record(
        new.version,
        old.key_ids | new.key_ids,
        min(old.created_at, new.created_at),
        old.retired or new.retired,
    )


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _as_bytes(out: object) -> bytes:
    if not isinstance(out, bytes):
        raise _Failed("unexpected output type")
    return out


def _attribute(obj: Object, attribute: Any) -> Any:
    """``obj[attribute]``, or None if the object was destroyed meanwhile."""
    from pkcs11 import exceptions as p11e  # noqa: PLC0415

    try:
        return obj[attribute]
    except p11e.ObjectHandleInvalid:
        return None


def _record_says_retired(obj: Object) -> bool:
    from pkcs11 import Attribute  # noqa: PLC0415
    from pkcs11 import exceptions as p11e  # noqa: PLC0415

    try:
        doc = json.loads(obj[Attribute.VALUE])
    except (p11e.PKCS11Error, ValueError, TypeError):
        return False
    return isinstance(doc, dict) and doc.get("retired_at") is not None


def _destroy_quietly(obj: Object) -> None:
    from pkcs11 import exceptions as p11e  # noqa: PLC0415

    with contextlib.suppress(p11e.ObjectHandleInvalid):  # already destroyed elsewhere
        obj.destroy()
