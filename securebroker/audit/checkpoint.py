"""Signed checkpoints: a broker process's Ed25519-signed statement of its audit chains' heads.

A checkpoint is written by one broker process (an *instance*), numbered ``n`` = 1, 2, 3, ... per
instance, each naming the SHA-256 of the previous checkpoint's body (``prev``), so deleting a
checkpoint from the middle of an instance's sequence is visible. Its body is UTF-8 JSON with sorted
keys (``msgspec.json.Encoder(order="sorted")``)::

    {"at_us": 1735689600000000, "final": false, "format": 1,
     "heads": [{"at_us": 1735689599000000, "chain": 1, "hash": "<hex sha256>", "seq": 42}],
     "instance": "host-1234-abcd", "n": 7, "prev": "<hex sha256 of checkpoint 6's body>"}

``heads`` is sorted by chain, one entry per chain; ``at_us`` of a head is the time of that head
record, ``final`` is true for the checkpoint written at shutdown, ``prev`` is null for ``n = 1``.
The signature is Ed25519 over ``b"sb-audit-checkpoint-v1" + body``; ``key_id`` is the first 16 hex
characters of SHA-256 of the raw 32-byte public key.

Records alone are only internally consistent: someone who can write the database can re-hash a
whole chain. A checkpoint pins a chain's head hash with a key the database does not hold, so the
offline verifier (``verify.py``) detects a re-hashed forgery, and a deletion of the newest
records, from the checkpoints in an export.

The signing key is a PEM PKCS#8 Ed25519 private key in a file with mode 0600 (refused when group
or others may access it), created atomically and never overwritten. Error messages name the file
and the problem, never key material.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from securebroker.errors import ConfigError, InternalError
from securebroker.secrets import check_private

__all__ = [
    "FORMAT",
    "SIGNATURE_DOMAIN",
    "AuditError",
    "Checkpoint",
    "CheckpointFormatError",
    "Head",
    "SigningKey",
    "checkpoint_body",
    "public_key_id",
    "verify_checkpoint_signature",
]

FORMAT: Final = 1
SIGNATURE_DOMAIN: Final = b"sb-audit-checkpoint-v1"
HASH_BYTES: Final = 32
PUBLIC_KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
KEY_ID_CHARS: Final = 16
#: chains are PostgreSQL bigints and ``genesis`` packs them in 8 bytes
MAX_CHAIN: Final = 2**63 - 1
MAX_KEY_FILE_BYTES: Final = 64 * 1024
_encode = msgspec.json.Encoder(order="sorted").encode
_BODY_FIELDS: Final = frozenset({"format", "instance", "n", "prev", "at_us", "final", "heads"})
_HEAD_FIELDS: Final = frozenset({"chain", "seq", "hash", "at_us"})
#: file modes mean something here (POSIX); elsewhere the permission check is skipped
_HAS_MODES: Final = os.name == "posix"


class AuditError(InternalError):
    """An audit trail operation failed (signing key, checkpoint, export bundle). Opaque
    ``internal`` on the wire, like keyring errors; the message is for operators and auditors."""

    code = "audit"
    retryable = False


class CheckpointFormatError(AuditError, ValueError):
    """A checkpoint body, or its export form, is not a valid format-1 checkpoint."""

    code = "audit_checkpoint_format"


@dataclass(frozen=True, slots=True)
class Head:
    """The newest record of one chain as a checkpoint saw it."""

    chain: int
    seq: int
    hash: bytes
    at_us: int

    def to_json(self) -> dict[str, Any]:
        return {"chain": self.chain, "seq": self.seq, "hash": self.hash.hex(), "at_us": self.at_us}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed checkpoint: the parsed fields and the exact signed ``body`` they came from."""

    instance: str
    n: int
    prev: bytes | None
    at_us: int
    final: bool
    heads: tuple[Head, ...]
    body: bytes
    signature: bytes
    key_id: str

    def digest(self) -> bytes:
        """SHA-256 of the body: what the next checkpoint of the same instance names as ``prev``."""
        return hashlib.sha256(self.body).digest()

    def head(self, chain: int) -> Head | None:
        for h in self.heads:
            if h.chain == chain:
                return h
        return None

    def to_json(self) -> dict[str, Any]:
        """The export form: the exact body text, the signature in hex and the key id."""
        return {
            "body": self.body.decode("utf-8"),
            "signature": self.signature.hex(),
            "key_id": self.key_id,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Checkpoint:
        """Parse the export form (other keys, such as a bundle line's ``type``, are ignored).
        Raises ``CheckpointFormatError``. The signature is *not* verified here."""
        if not isinstance(d, Mapping):
            raise CheckpointFormatError("checkpoint must be a JSON object")
        body = d.get("body")
        if not isinstance(body, str):
            raise CheckpointFormatError("checkpoint 'body' must be a string")
        sig_hex = d.get("signature")
        if not isinstance(sig_hex, str):
            raise CheckpointFormatError("checkpoint 'signature' must be a hex string")
        try:
            signature = bytes.fromhex(sig_hex)
        except ValueError:
            raise CheckpointFormatError("checkpoint 'signature' is not valid hex") from None
        if len(signature) != SIGNATURE_BYTES:
            raise CheckpointFormatError(
                f"checkpoint 'signature' must be {SIGNATURE_BYTES} bytes, found {len(signature)}"
            )
        key_id = d.get("key_id")
        if not _is_key_id(key_id):
            raise CheckpointFormatError(
                f"checkpoint 'key_id' must be {KEY_ID_CHARS} lowercase hex characters"
            )
        assert isinstance(key_id, str)
        try:
            raw = body.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointFormatError("checkpoint 'body' is not valid UTF-8 text") from None
        return cls.parse(raw, signature, key_id)

    @classmethod
    def parse(cls, body: bytes, signature: bytes, key_id: str) -> Checkpoint:
        """Build a checkpoint from its signed body; validates every field of the body (raises
        ``CheckpointFormatError`` naming the field). The signature is *not* verified here."""
        instance, n, prev, at_us, final, heads = parse_body(body)
        return cls(instance, n, prev, at_us, final, heads, bytes(body), signature, key_id)


# -- body -----------------------------------------------------------------------------------


def checkpoint_body(
    instance: str, n: int, prev: bytes | None, at_us: int, final: bool, heads: Iterable[Head]
) -> bytes:
    """The canonical body bytes (heads sorted by chain); raises ``CheckpointFormatError`` for
    values a verifier would refuse."""
    ordered = tuple(sorted(heads, key=lambda h: h.chain))
    _check_fields(instance, n, prev, at_us, final, ordered)
    return _encode(
        {
            "format": FORMAT,
            "instance": instance,
            "n": n,
            "prev": None if prev is None else prev.hex(),
            "at_us": at_us,
            "final": final,
            "heads": [h.to_json() for h in ordered],
        }
    )


def parse_body(body: bytes) -> tuple[str, int, bytes | None, int, bool, tuple[Head, ...]]:
    """``(instance, n, prev, at_us, final, heads)`` of a checkpoint body; raises
    ``CheckpointFormatError`` with a message naming the offending field."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise CheckpointFormatError(f"checkpoint body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CheckpointFormatError("checkpoint body must be a JSON object")
    missing = _BODY_FIELDS - set(doc)
    if missing:
        raise CheckpointFormatError(f"checkpoint body: missing {', '.join(sorted(missing))}")
    unknown = set(doc) - _BODY_FIELDS
    if unknown:
        names = ", ".join(sorted(map(str, unknown)))
        raise CheckpointFormatError(f"checkpoint body: unknown field(s): {names}")
    if type(doc["format"]) is not int or doc["format"] != FORMAT:
        raise CheckpointFormatError(
            f"checkpoint body: unsupported format {doc['format']!r} (expected {FORMAT})"
        )
    instance = doc["instance"]
    if not isinstance(instance, str):
        raise CheckpointFormatError("checkpoint body: 'instance' must be a string")
    n = _body_int(doc, "n")
    at_us = _body_int(doc, "at_us")
    final = doc["final"]
    if not isinstance(final, bool):
        raise CheckpointFormatError("checkpoint body: 'final' must be true or false")
    prev_raw = doc["prev"]
    prev = None if prev_raw is None else _hash_field(prev_raw, "'prev'")
    raw_heads = doc["heads"]
    if not isinstance(raw_heads, list):
        raise CheckpointFormatError("checkpoint body: 'heads' must be a list")
    heads = tuple(_parse_head(raw, i) for i, raw in enumerate(raw_heads))
    _check_fields(instance, n, prev, at_us, final, heads)
    return instance, n, prev, at_us, final, heads


def _parse_head(raw: object, index: int) -> Head:
    where = f"checkpoint body: heads[{index}]"
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{where} must be an object")
    if set(raw) != _HEAD_FIELDS:
        raise CheckpointFormatError(f"{where} must have exactly the fields at_us, chain, hash, seq")
    chain, seq, at_us = raw["chain"], raw["seq"], raw["at_us"]
    for name, value in (("chain", chain), ("seq", seq), ("at_us", at_us)):
        if type(value) is not int:
            raise CheckpointFormatError(f"{where}: '{name}' must be an integer")
    return Head(chain, seq, _hash_field(raw["hash"], f"heads[{index}] 'hash'"), at_us)


def _check_fields(
    instance: str, n: int, prev: bytes | None, at_us: int, final: bool, heads: tuple[Head, ...]
) -> None:
    def bad(problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"checkpoint body: {problem}")

    if not isinstance(instance, str) or not instance:
        raise bad("'instance' must be a non-empty string")
    if type(n) is not int or n < 1:
        raise bad("'n' must be a positive integer")
    if prev is not None and (not isinstance(prev, bytes) or len(prev) != HASH_BYTES):
        raise bad(f"'prev' must be {HASH_BYTES} bytes or null")
    if n == 1 and prev is not None:
        raise bad("the first checkpoint of an instance (n = 1) has no 'prev'")
    if n > 1 and prev is None:
        raise bad(f"checkpoint n = {n} must name its predecessor in 'prev'")
    if type(at_us) is not int:
        raise bad("'at_us' must be an integer")
    if not isinstance(final, bool):
        raise bad("'final' must be a boolean")
    last = -1
    for h in heads:
        if not isinstance(h, Head):
            raise bad("heads must be Head values")
        if type(h.chain) is not int or not 0 <= h.chain <= MAX_CHAIN:
            raise bad(f"head chain {h.chain!r} out of range")
        if h.chain <= last:
            raise bad(f"heads must be sorted by chain, one per chain (chain {h.chain})")
        last = h.chain
        if type(h.seq) is not int or h.seq < 1:
            raise bad(f"head of chain {h.chain}: 'seq' must be a positive integer")
        if not isinstance(h.hash, bytes) or len(h.hash) != HASH_BYTES:
            raise bad(f"head of chain {h.chain}: 'hash' must be {HASH_BYTES} bytes")
        if type(h.at_us) is not int:
            raise bad(f"head of chain {h.chain}: 'at_us' must be an integer")


def _body_int(doc: dict[str, Any], name: str) -> int:
    value = doc[name]
    if type(value) is not int:
        raise CheckpointFormatError(f"checkpoint body: '{name}' must be an integer")
    return value


def _hash_field(value: object, name: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * HASH_BYTES:
        raise CheckpointFormatError(f"checkpoint body: {name} must be {2 * HASH_BYTES} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise CheckpointFormatError(f"checkpoint body: {name} is not valid hex") from None


def _is_key_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == KEY_ID_CHARS
        and all(c in "0123456789abcdef" for c in value)
    )


# -- keys and signatures ------------------------------------------------------------------


def public_key_id(raw: bytes) -> str:
    """The key id of a raw 32-byte Ed25519 public key: first 16 hex chars of its SHA-256."""
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_CHARS]


def verify_checkpoint_signature(cp: Checkpoint, raw_public_key: bytes) -> bool:
    """True when ``cp.signature`` is a valid Ed25519 signature of ``cp.body`` under the raw
    32-byte public key (False for a wrong key, a tampered body or an invalid key)."""
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(raw_public_key)
        key.verify(cp.signature, SIGNATURE_DOMAIN + cp.body)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def public_key_from_pem(data: bytes, *, source: str = "public key") -> bytes:
    """The raw 32 bytes of a PEM (SubjectPublicKeyInfo) Ed25519 public key; raises
    ``ConfigError`` naming ``source``."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{source} is not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{source} must be an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SigningKey:
    """The Ed25519 key a broker signs checkpoints with (see the module docstring)."""

    __slots__ = ("_key", "_public")

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self._public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key in memory only (tests, or before ``save``-free uses)."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path | str, *, setting: str = "audit signing key") -> SigningKey:
        """Load a PEM PKCS#8 Ed25519 private key. Raises ``ConfigError`` when the file is missing,
        accessible by group or others (POSIX), not a regular file, or not an unencrypted Ed25519
        PEM key; ``setting`` names the configuration key in those messages."""
        path = Path(path)
        if _HAS_MODES:
            check_private(path, setting=setting)
        nofollow = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, os.O_RDONLY | nofollow)
        except FileNotFoundError:
            raise ConfigError(f"{setting}: file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"{setting}: {path}: cannot open: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{setting}: {path} is not a regular file")
            if _HAS_MODES and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"{setting}: {path} is accessible by other users; chmod 600 it")
            if st.st_size > MAX_KEY_FILE_BYTES:
                raise ConfigError(f"{setting}: {path} is too large to be a key file")
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read(MAX_KEY_FILE_BYTES + 1)
        finally:
            os.close(fd)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise ConfigError(
                f"{setting}: {path} is encrypted; an unencrypted key is needed"
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(f"{setting}: {path} is not a PEM private key") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{setting}: {path} must be an Ed25519 key")
        return cls(key)

    @classmethod
    def create(cls, path: Path | str) -> SigningKey:
        """Create a new key file (PEM PKCS#8, mode 0600, written atomically); refuses to
        overwrite an existing file (``AuditError``), even one created concurrently."""
        path = Path(path)
        if path.exists() or path.is_symlink():
            raise AuditError(f"audit signing key {path} already exists; refusing to overwrite it")
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = private_temp(path)
        try:
            with os.fdopen(_open_private(tmp), "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            publish_file(tmp, path, overwrite=False, what="audit signing key")
        finally:
            tmp.unlink(missing_ok=True)
        return cls(key)

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (what bundles carry and auditors pin)."""
        return self._public

    def public_pem(self) -> bytes:
        """The public key as PEM SubjectPublicKeyInfo (for publishing to auditors)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_id(self) -> str:
        return public_key_id(self._public)

    def sign_checkpoint(
        self,
        instance: str,
        n: int,
        prev: bytes | None,
        at_us: int,
        final: bool,
        heads: Iterable[Head],
    ) -> Checkpoint:
        """Build the canonical body (heads sorted by chain) and sign it."""
        ordered = tuple(sorted(heads, key=lambda h: h.chain))
        body = checkpoint_body(instance, n, prev, at_us, final, ordered)
        signature = self._key.sign(SIGNATURE_DOMAIN + body)
        return Checkpoint(instance, n, prev, at_us, final, ordered, body, signature, self.key_id)


# -- private files (shared with bundle.py) ------------------------------------------------


def private_temp(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (same directory, so a rename is atomic)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _open_private(tmp: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return os.open(tmp, flags, 0o600)


def open_private_temp(path: Path) -> tuple[Path, int]:
    """Create a new temporary file (mode 0600) next to ``path``; returns its path and fd."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = private_temp(path)
    return tmp, _open_private(tmp)


def publish_file(tmp: Path, path: Path, *, overwrite: bool, what: str) -> None:
    """Move the complete, fsynced ``tmp`` to ``path`` atomically, then fsync the directory.

    Without ``overwrite`` an existing ``path`` is refused (``AuditError``) by hard-linking, which
    fails atomically when the name exists; ``tmp`` is left for the caller to remove.
    """
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise AuditError(f"{what} {path} already exists; refusing to overwrite it") from None
        except OSError as exc:
            if exc.errno not in {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}:
                raise
            # a file system without hard links: best effort (a tiny race remains)
            if path.exists() or path.is_symlink():
                raise AuditError(
                    f"{what} {path} already exists; refusing to overwrite it"
                ) from None
            os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    if not _HAS_MODES:
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
