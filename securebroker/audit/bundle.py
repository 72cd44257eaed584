"""Export bundles: a self-contained audit export an auditor verifies without the database.

A bundle is JSON Lines (gzip-compressed when the file name ends with ``.gz``; reading detects gzip
by its magic bytes, whatever the name)::

    {"type": "header", "format": 2, "created_at": "<ISO 8601>", "since": "<ISO 8601>" | null,
     "until": "<ISO 8601>" | null, "source": "...",
     "public_keys": [{"key_id": "<16 hex>", "public_key": "<hex of the raw 32-byte key>"}]}
    {"type": "record", ...AuditRecord.to_json()}
    {"type": "checkpoint", "body": "<exact signed body>", "signature": "<hex>", "key_id": "..."}

The header comes first; records and checkpoints follow in any order. ``since``/``until`` is the
export window (record times; null means unbounded): the verifier expects every record whose time
lies inside it, so an export *without* ``since`` claims to hold every chain from seq 1.

The header is not signed: it only tells the verifier which keys to try. Trust comes from the
auditor pinning the broker's public key (``verify --public-key``).

``BundleWriter`` streams to a temporary file (mode 0600) and renames it into place only when
closed successfully; ``read_bundle`` collects malformed lines instead of stopping at them.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

import msgspec

from securebroker.audit.checkpoint import (
    MAX_CHAIN,
    PUBLIC_KEY_BYTES,
    AuditError,
    Checkpoint,
    CheckpointFormatError,
    open_private_temp,
    public_key_id,
    publish_file,
)
from securebroker.audit.record import AuditRecord

__all__ = ["Bundle", "BundleError", "BundleHeader", "BundleWriter", "read_bundle"]

#: bundles are written in format 2: records may be batch records (ADR 0013), which a
#: format-1 verifier would misread as altered, so it must refuse the bundle instead
FORMAT: Final = 2
#: formats this verifier reads (format 1: records of one message only)
READABLE: Final = (1, 2)
_GZIP_MAGIC: Final = b"\x1f\x8b"
_encode = msgspec.json.Encoder().encode


class BundleError(AuditError):
    """The bundle cannot be read at all (missing file, no header, unknown format)."""

    code = "audit_bundle"


@dataclass(frozen=True, slots=True)
class BundleHeader:
    created_at: datetime
    since: datetime | None
    until: datetime | None
    #: raw 32-byte Ed25519 public keys the checkpoints may be signed with
    public_keys: tuple[bytes, ...]
    source: str
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "header",
            "format": self.format,
            "created_at": self.created_at.isoformat(),
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "public_keys": [
                {"key_id": public_key_id(k), "public_key": k.hex()} for k in self.public_keys
            ],
            "source": self.source,
        }


@dataclass(slots=True)
class Bundle:
    header: BundleHeader
    records: list[AuditRecord] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    #: chain -> (seq, hash) of its last record before the window (``since``): where the
    #: bundle's part of the chain must continue from
    anchors: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    #: (line number, problem) for each line that could not be used; never fatal
    malformed: list[tuple[int, str]] = field(default_factory=list)


# -- writing ----------------------------------------------------------------------------------


class BundleWriter:
    """Stream a bundle to ``path``::

        with BundleWriter(path, since, until, [key.public_bytes()], "db01/securebroker") as w:
            for r in records:
                w.record(r)
            w.checkpoint(cp)

    The file appears (mode 0600, atomically) only when the block exits without an exception;
    otherwise the temporary file is removed. An existing ``path`` is refused unless
    ``overwrite=True``.
    """

    def __init__(
        self,
        path: Path | str,
        since: datetime | None,
        until: datetime | None,
        public_keys: Sequence[bytes],
        source: str,
        *,
        overwrite: bool = False,
        created_at: datetime | None = None,
    ) -> None:
        self.path = Path(path)
        for name, value in (("since", since), ("until", until), ("created_at", created_at)):
            if value is not None and value.utcoffset() is None:
                raise ValueError(f"bundle {name} must be a timezone-aware datetime")
        for k in public_keys:
            if not isinstance(k, bytes) or len(k) != PUBLIC_KEY_BYTES:
                raise ValueError(f"public keys must be raw {PUBLIC_KEY_BYTES}-byte Ed25519 keys")
        self.header = BundleHeader(
            created_at=created_at or datetime.now(UTC),
            since=since,
            until=until,
            public_keys=tuple(dict.fromkeys(public_keys)),
            source=source,
        )
        self.overwrite = overwrite
        self.records = 0
        self.checkpoints = 0
        self._tmp: Path | None = None
        self._raw: IO[bytes] | None = None
        self._out: IO[bytes] | gzip.GzipFile | None = None
        self._closed = False

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        """Create the temporary file and write the header (``__enter__`` calls this)."""
        if self._raw is not None or self._closed:
            raise AuditError("bundle writer already opened")
        if not self.overwrite and (self.path.exists() or self.path.is_symlink()):
            raise BundleError(f"bundle {self.path} already exists; refusing to overwrite it")
        self._tmp, fd = open_private_temp(self.path)
        self._raw = os.fdopen(fd, "wb")
        if self.path.name.endswith(".gz"):
            self._out = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)
        else:
            self._out = self._raw
        self._line(self.header.to_json())

    def record(self, r: AuditRecord) -> None:
        self._line({"type": "record", **r.to_json()})
        self.records += 1

    def checkpoint(self, cp: Checkpoint) -> None:
        self._line({"type": "checkpoint", **cp.to_json()})
        self.checkpoints += 1

    def anchor(self, chain: int, seq: int, hash_: bytes) -> None:
        """The last record of ``chain`` before the window: the window's first record of that
        chain must link to it (a deleted start of the window is then caught)."""
        self._line({"type": "anchor", "chain": chain, "seq": seq, "hash": hash_.hex()})

    def close(self) -> None:
        """Finish the file, fsync it and rename it into place."""
        if self._raw is None or self._tmp is None or self._out is None:
            raise AuditError("bundle writer is not open")
        try:
            if self._out is not self._raw:
                self._out.close()  # writes the gzip trailer; leaves the raw file open
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            publish_file(self._tmp, self.path, overwrite=self.overwrite, what="bundle")
        finally:
            self._discard()

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        self._discard()

    def _discard(self) -> None:
        out, raw, tmp = self._out, self._raw, self._tmp
        self._out = self._raw = self._tmp = None
        self._closed = True
        try:
            if out is not None and out is not raw and not out.closed:
                out.close()
        finally:
            if raw is not None and not raw.closed:
                raw.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _line(self, doc: dict[str, Any]) -> None:
        if self._out is None:
            raise AuditError("bundle writer is not open (use it as a context manager)")
        self._out.write(_encode(doc) + b"\n")


# -- reading ----------------------------------------------------------------------------------


def read_bundle(path: Path | str) -> Bundle:
    """Read a bundle (plain or gzip). Raises ``BundleError`` when the file cannot be opened, has
    no valid header on line 1, or has an unknown format; every other bad line is recorded in
    ``Bundle.malformed`` and skipped."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise BundleError(f"bundle {path}: cannot open: {exc.strerror or exc}") from None
    with fh:
        try:
            magic = fh.read(2)
            fh.seek(0)
        except OSError as exc:
            raise BundleError(f"bundle {path}: cannot read: {exc.strerror or exc}") from None
        if magic == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                return _read_lines(path, gz)
        return _read_lines(path, fh)


def _iter_lines(
    path: Path, stream: IO[bytes] | gzip.GzipFile, malformed: list[tuple[int, str]]
) -> Iterator[bytes]:
    """The lines of ``stream``; a corrupt or cut-short gzip stream after the first line ends the
    iteration with a malformed entry (what was read is still verified)."""
    line_no = 0
    while True:
        try:
            line = stream.readline()
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
            if line_no == 0:
                raise BundleError(f"bundle {path}: cannot read: {exc}") from None
            malformed.append(
                (line_no + 1, f"the file is corrupt or cut short after line {line_no} ({exc})")
            )
            return
        if not line:
            return
        line_no += 1
        yield line


def _read_lines(path: Path, stream: IO[bytes] | gzip.GzipFile) -> Bundle:
    malformed: list[tuple[int, str]] = []
    header: BundleHeader | None = None
    bundle: Bundle | None = None
    for line_no, line in enumerate(_iter_lines(path, stream, malformed), start=1):
        if header is None:
            header = _parse_header(path, line, malformed)
            bundle = Bundle(header, malformed=malformed)
            continue
        assert bundle is not None
        if not line.strip():
            continue
        _read_line(bundle, line_no, line)
    if bundle is None:
        raise BundleError(f"bundle {path}: the file is empty (no header line)")
    return bundle


def _read_line(bundle: Bundle, line_no: int, line: bytes) -> None:
    def bad(problem: str) -> None:
        bundle.malformed.append((line_no, problem))

    try:
        doc = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        bad(f"not valid JSON ({exc})")
        return
    if not isinstance(doc, dict):
        bad("not a JSON object")
        return
    kind = doc.get("type")
    if kind == "record":
        try:
            r = AuditRecord.from_json(doc)
        except KeyError as exc:
            bad(f"record: missing field {exc}")
            return
        except (TypeError, ValueError) as exc:
            bad(f"record: {exc}")
            return
        if not 0 <= r.chain <= MAX_CHAIN or r.seq < 1:
            bad(f"record: chain {r.chain} seq {r.seq} is out of range")
            return
        bundle.records.append(r)
    elif kind == "checkpoint":
        try:
            bundle.checkpoints.append(Checkpoint.from_json(doc))
        except CheckpointFormatError as exc:
            bad(str(exc))
    elif kind == "anchor":
        chain, seq, h = doc.get("chain"), doc.get("seq"), doc.get("hash")
        if type(chain) is not int or type(seq) is not int or not isinstance(h, str):
            bad("anchor: chain, seq and hash are required")
            return
        try:
            raw = bytes.fromhex(h)
        except ValueError:
            bad("anchor: hash is not hex")
            return
        if not 0 <= chain <= MAX_CHAIN or seq < 1 or len(raw) != 32:
            bad(f"anchor: chain {chain} seq {seq} is out of range")
            return
        bundle.anchors[chain] = (seq, raw)
    elif kind == "header":
        bad("a second header line")
    else:
        bad(f"unknown line type {kind!r}" if isinstance(kind, str) else "line has no 'type'")


def _parse_header(path: Path, line: bytes, malformed: list[tuple[int, str]]) -> BundleHeader:
    def bad(problem: str) -> BundleError:
        return BundleError(f"bundle {path}: {problem}")

    try:
        doc = msgspec.json.decode(line)
    except msgspec.DecodeError:
        raise bad("line 1 is not a bundle header (not JSON; is this an audit export?)") from None
    if not isinstance(doc, dict) or doc.get("type") != "header":
        raise bad("line 1 is not a bundle header (is this an audit export?)")
    fmt = doc.get("format")
    if type(fmt) is not int or fmt not in READABLE:
        raise bad(f"unsupported bundle format {fmt!r} (this verifier reads formats 1 and 2)")
    created_at = _time(doc.get("created_at"), "created_at", bad, optional=False)
    assert created_at is not None
    since = _time(doc.get("since"), "since", bad, optional=True)
    until = _time(doc.get("until"), "until", bad, optional=True)
    if since is not None and until is not None and since > until:
        raise bad("header: 'since' is after 'until'")
    source = doc.get("source", "")
    if not isinstance(source, str):
        raise bad("header: 'source' must be a string")
    raw_keys = doc.get("public_keys", [])
    if not isinstance(raw_keys, list):
        raise bad("header: 'public_keys' must be a list")
    keys: list[bytes] = []
    for index, entry in enumerate(raw_keys):
        key = _header_key(entry)
        if isinstance(key, str):
            malformed.append((1, f"header: public_keys[{index}]: {key}; key ignored"))
        elif key not in keys:
            keys.append(key)
    return BundleHeader(created_at, since, until, tuple(keys), source, fmt)


def _header_key(entry: object) -> bytes | str:
    """The raw key of a header entry, or what is wrong with it."""
    if not isinstance(entry, dict):
        return "must be an object"
    raw_hex, key_id = entry.get("public_key"), entry.get("key_id")
    if not isinstance(raw_hex, str):
        return "'public_key' must be a hex string"
    try:
        raw = bytes.fromhex(raw_hex)
    except ValueError:
        return "'public_key' is not valid hex"
    if len(raw) != PUBLIC_KEY_BYTES:
        return f"'public_key' must be {PUBLIC_KEY_BYTES} bytes, found {len(raw)}"
    if key_id != public_key_id(raw):
        return f"'key_id' {key_id!r} does not match the key (its id is {public_key_id(raw)})"
    return raw


def _time(
    value: object, name: str, bad: Callable[[str], BundleError], *, optional: bool
) -> datetime | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise bad(f"header: '{name}' must be an ISO 8601 timestamp")
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise bad(f"header: '{name}' is not an ISO 8601 timestamp") from None
    if at.utcoffset() is None:
        raise bad(f"header: '{name}' must include a UTC offset")
    return at
