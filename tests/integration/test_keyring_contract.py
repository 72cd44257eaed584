"""One contract for every KEK keyring provider: the file keyring and the PKCS#11 keyring (on a
private SoftHSM2 token per test), then provider-specific checks.

SoftHSM2 is a test prerequisite, installed by ``scripts/_venv.sh``: when it is missing the
``pkcs11`` cases FAIL (they do not skip), so CI cannot silently lose them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hsm_fixtures import PIN, SUBPROCESS_TIMEOUT, TOKEN

from securebroker.crypto.filekeyring import FileKeyring
from securebroker.crypto.keyring import KekState, Keyring, KeyringError, UnwrapError
from securebroker.errors import ConfigError

DEK = bytes(range(32))
AAD = b"dek:0001|scope:topic/orders"


# -- provider harness ---------------------------------------------------------------------


@dataclass
class Harness:
    """One provider under test. ``open()`` builds another instance on the same backing store
    (what another broker process or the CLI would see); ``spec`` lets a subprocess do so."""

    name: str
    open: Callable[[], Any]
    spec: dict[str, Any]
    kek_secrets: Callable[[], list[bytes]] = field(default=lambda: [])

    def leak_check(self, exc: BaseException, *extra: bytes) -> None:
        """No key material (KEKs we can see, the DEK) in the message or the log detail."""
        text = f"{exc} {getattr(exc, 'detail', '') or ''}"
        for secret in [*self.kek_secrets(), *extra]:
            for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
                assert form not in text, f"key material in error: {text!r}"


def _file_secrets(path: Path) -> list[bytes]:
    doc = json.loads(path.read_text())
    return [base64.b64decode(v["key"]) for v in doc["versions"] if v.get("key")]


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Default lock files (``tempfile.gettempdir()``) go to this test's directory, here and in
    the subprocesses it starts."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture(params=["file", "pkcs11"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    opened: list[Any] = []
    if request.param == "file":
        path = tmp_path / "keys" / "keyring.json"

        def open_file() -> FileKeyring:
            return FileKeyring(path)

        FileKeyring.create(path)
        yield Harness("file", open_file, {"provider": "file", "path": str(path)},
                      lambda: _file_secrets(path))  # fmt: skip
        return

    module = request.getfixturevalue("softhsm")
    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring  # noqa: PLC0415

    lock = tmp_path / "kek.lock"

    def open_hsm() -> Pkcs11Keyring:
        kr = Pkcs11Keyring(module, TOKEN, PIN, lock_path=lock)
        opened.append(kr)
        return kr

    opened.append(Pkcs11Keyring.initialise(module, TOKEN, PIN, lock_path=lock))
    spec = {"provider": "pkcs11", "module": module, "token": TOKEN, "pin": PIN, "lock": str(lock)}
    try:
        yield Harness("pkcs11", open_hsm, spec)
    finally:
        for kr in opened:
            kr.close()


@pytest.fixture
def kr(harness: Harness) -> Keyring:
    keyring: Keyring = harness.open()
    return keyring


def states(keyring: Keyring) -> dict[int, KekState]:
    return {info.version: info.state for info in keyring.versions()}


# -- the contract -------------------------------------------------------------------------


def test_fresh_keyring_has_version_1_primary(kr: Keyring, harness: Harness) -> None:
    assert kr.provider == harness.name
    assert kr.primary() == 1
    [info] = kr.versions()
    assert (info.version, info.state) == (1, KekState.PRIMARY)
    assert isinstance(info.created_at, datetime) and info.created_at.utcoffset() is not None


def test_wrap_unwrap_round_trip(kr: Keyring) -> None:
    wrapped = kr.wrap(1, DEK, AAD)
    assert len(wrapped) == 12 + len(DEK) + 16  # nonce || ciphertext || tag
    assert DEK not in wrapped
    assert kr.unwrap(1, wrapped, AAD) == DEK
    assert kr.unwrap(1, kr.wrap(1, b"k", b""), b"") == b"k"  # empty AAD, short DEK


def test_nonces_are_random(kr: Keyring) -> None:
    outputs = {kr.wrap(1, DEK, AAD) for _ in range(16)}
    assert len(outputs) == 16
    assert len({w[:12] for w in outputs}) == 16


def test_unwrap_refuses_wrong_aad(kr: Keyring, harness: Harness) -> None:
    wrapped = kr.wrap(1, DEK, AAD)
    for aad in (b"", AAD + b"x", AAD[:-1], b"dek:0002|scope:topic/orders"):
        with pytest.raises(UnwrapError) as err:
            kr.unwrap(1, wrapped, aad)
        harness.leak_check(err.value, DEK)


def test_unwrap_refuses_wrong_or_unknown_version(kr: Keyring, harness: Harness) -> None:
    wrapped = kr.wrap(1, DEK, AAD)
    new = kr.rotate()
    for version in (new, 99, 0, -1):
        with pytest.raises(UnwrapError) as err:
            kr.unwrap(version, wrapped, AAD)
        harness.leak_check(err.value, DEK)
    assert kr.unwrap(1, wrapped, AAD) == DEK


def test_unwrap_refuses_tampered_bytes(kr: Keyring, harness: Harness) -> None:
    wrapped = kr.wrap(1, DEK, AAD)
    for index in (0, 11, 12, 20, len(wrapped) - 17, len(wrapped) - 1):  # nonce, body, tag
        tampered = bytearray(wrapped)
        tampered[index] ^= 0x01
        with pytest.raises(UnwrapError) as err:
            kr.unwrap(1, bytes(tampered), AAD)
        harness.leak_check(err.value, DEK)
    with pytest.raises(UnwrapError):
        kr.unwrap(1, wrapped + b"\x00", AAD)


def test_unwrap_refuses_truncated(kr: Keyring, harness: Harness) -> None:
    wrapped = kr.wrap(1, DEK, AAD)
    for length in (0, 1, 11, 12, 28, len(wrapped) - 16, len(wrapped) - 1):
        with pytest.raises(UnwrapError) as err:
            kr.unwrap(1, wrapped[:length], AAD)
        harness.leak_check(err.value, DEK)


def test_wrap_refuses_bad_arguments(kr: Keyring) -> None:
    with pytest.raises(KeyringError):
        kr.wrap(1, b"", AAD)
    for version in (0, -1, 99, 2**40):
        with pytest.raises(KeyringError):
            kr.wrap(version, DEK, AAD)


def test_rotate_makes_new_primary_old_versions_unwrap(kr: Keyring, harness: Harness) -> None:
    w1 = kr.wrap(1, DEK, AAD)
    assert kr.rotate() == 2
    assert kr.primary() == 2
    assert states(kr) == {1: KekState.ACTIVE, 2: KekState.PRIMARY}
    w2 = kr.wrap(2, DEK, AAD)
    assert kr.unwrap(1, w1, AAD) == DEK
    assert kr.unwrap(2, w2, AAD) == DEK
    assert kr.wrap(1, DEK, AAD)  # active versions may still wrap (re-wrap flows)
    created = {info.version: info.created_at for info in kr.versions()}
    assert created[2] >= created[1]


def test_other_instance_sees_rotation_after_refresh(kr: Keyring, harness: Harness) -> None:
    other = harness.open()  # another broker process / the CLI
    w1 = other.wrap(1, DEK, AAD)
    assert kr.rotate() == 2
    assert other.primary() == 1  # no I/O on primary(): stale until refresh
    other.refresh()
    assert other.primary() == 2
    assert states(other) == {1: KekState.ACTIVE, 2: KekState.PRIMARY}
    assert other.unwrap(1, w1, AAD) == DEK
    assert kr.unwrap(2, other.wrap(2, DEK, AAD), AAD) == DEK


def test_unknown_version_refreshes_lazily(kr: Keyring, harness: Harness) -> None:
    other = harness.open()
    kr.rotate()
    w2 = kr.wrap(2, DEK, AAD)
    assert other.unwrap(2, w2, AAD) == DEK  # a DEK wrapped after another process rotated
    assert other.primary() == 2


def test_subprocess_rotation_is_seen_after_refresh(kr: Keyring, harness: Harness) -> None:
    [got] = _run_rotators(harness, processes=1, rotations=1)
    assert got == [2]
    assert kr.primary() == 1
    kr.refresh()
    assert kr.primary() == 2
    assert kr.unwrap(2, kr.wrap(2, DEK, AAD), AAD) == DEK


def test_two_instances_rotating_in_a_row_lose_no_version(kr: Keyring, harness: Harness) -> None:
    other = harness.open()  # loaded before either rotation: its view is stale
    assert kr.rotate() == 2
    w2 = kr.wrap(2, DEK, AAD)
    assert other.rotate() == 3  # re-reads the store before adding a version
    kr.refresh()
    expected = {1: KekState.ACTIVE, 2: KekState.ACTIVE, 3: KekState.PRIMARY}
    assert states(kr) == expected
    assert states(other) == expected
    assert other.unwrap(2, w2, AAD) == DEK
    assert kr.unwrap(3, other.wrap(3, DEK, AAD), AAD) == DEK


def test_concurrent_rotations_from_two_processes_lose_no_version(
    kr: Keyring, harness: Harness
) -> None:
    results = _run_rotators(harness, processes=2, rotations=6)
    created = [v for got in results for v in got]
    assert len(created) == len(set(created)) == 12, results
    kr.refresh()
    live = {v for v, s in states(kr).items() if s is not KekState.RETIRED}
    assert live == {1, *created}
    assert kr.primary() == max(created)
    for version in live:
        assert kr.unwrap(version, kr.wrap(version, DEK, AAD), AAD) == DEK


def test_retire_below(kr: Keyring, harness: Harness) -> None:
    w1 = kr.wrap(1, DEK, AAD)
    kr.rotate()
    w2 = kr.wrap(2, DEK, AAD)
    kr.rotate()
    other = harness.open()
    assert kr.retire_below(2) == [1]
    assert states(kr) == {1: KekState.RETIRED, 2: KekState.ACTIVE, 3: KekState.PRIMARY}
    with pytest.raises(UnwrapError) as err:
        kr.unwrap(1, w1, AAD)
    harness.leak_check(err.value, DEK)
    with pytest.raises(KeyringError, match="retired"):
        kr.wrap(1, DEK, AAD)
    assert kr.unwrap(2, w2, AAD) == DEK
    assert kr.unwrap(3, kr.wrap(3, DEK, AAD), AAD) == DEK
    assert kr.retire_below(2) == []  # idempotent
    other.refresh()
    assert states(other) == states(kr)
    with pytest.raises(UnwrapError):
        other.unwrap(1, w1, AAD)
    assert kr.retire_below(3) == [2]
    assert states(kr) == {1: KekState.RETIRED, 2: KekState.RETIRED, 3: KekState.PRIMARY}
    with pytest.raises(UnwrapError):
        kr.unwrap(2, w2, AAD)


def test_retire_below_refuses_the_primary(kr: Keyring) -> None:
    kr.rotate()
    with pytest.raises(KeyringError, match="primary"):
        kr.retire_below(3)
    with pytest.raises(KeyringError, match="primary"):
        kr.retire_below(100)
    assert states(kr) == {1: KekState.ACTIVE, 2: KekState.PRIMARY}
    assert kr.retire_below(2) == [1]
    assert kr.retire_below(1) == []
    assert kr.primary() == 2


def test_retired_versions_stay_retired_after_rotation(kr: Keyring) -> None:
    kr.rotate()
    kr.retire_below(2)
    assert kr.rotate() == 3
    assert states(kr) == {1: KekState.RETIRED, 2: KekState.ACTIVE, 3: KekState.PRIMARY}


# -- subprocess helper --------------------------------------------------------------------

_ROTATOR = r"""
import json, sys
from pathlib import Path
from securebroker.crypto.keyring import KeyringError
spec = json.loads(sys.stdin.readline())
if spec["provider"] == "file":
    from securebroker.crypto.filekeyring import FileKeyring
    kr = FileKeyring(Path(spec["path"]))
else:
    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring
    kr = Pkcs11Keyring(spec["module"], spec["token"], spec["pin"], lock_path=Path(spec["lock"]))
print("ready", flush=True)
sys.stdin.readline()  # "go": all rotators start together
got, contended = [], 0
while len(got) < spec["rotations"]:
    try:
        got.append(kr.rotate())
    except KeyringError as exc:  # the HSM provider may ask to retry under contention
        if "try again" not in str(exc) or contended > 50:
            raise
        contended += 1
print(json.dumps(got), flush=True)
"""


def _run_rotators(harness: Harness, *, processes: int, rotations: int) -> list[list[int]]:
    """Start ``processes`` Python processes that each rotate ``rotations`` times, released
    together; return what each created."""
    spec = json.dumps({**harness.spec, "rotations": rotations}) + "\n"
    with contextlib.ExitStack() as stack:
        procs = []
        for _ in range(processes):
            proc = stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", _ROTATOR],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            stack.callback(_kill_if_running, proc)
            watchdog = threading.Timer(SUBPROCESS_TIMEOUT, proc.kill)  # bounds the readline
            watchdog.start()
            stack.callback(watchdog.cancel)
            procs.append(proc)
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(spec)
            proc.stdin.flush()
            line = proc.stdout.readline()  # bounded: the child exits on any error
            assert line == "ready\n", (line, proc.stderr.read() if proc.stderr else "")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, errs = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
            assert proc.returncode == 0, errs
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results


def _kill_if_running(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


# -- file provider ------------------------------------------------------------------------

KEY_A = bytes([0xA5] * 32)
KEY_B = bytes(range(100, 132))


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": 1,
        "primary": 2,
        "versions": [
            {"version": 1, "state": "active", "created_at": "2025-01-01T00:00:00+00:00",
             "key": _b64(KEY_A)},
            {"version": 2, "state": "primary", "created_at": "2025-02-01T00:00:00+00:00",
             "key": _b64(KEY_B)},
        ],
    }  # fmt: skip
    doc.update(overrides)
    return doc


def _write(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def _entry(
    version: int, state: str, material: bytes | None = KEY_A, **extra: Any
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "version": version,
        "state": state,
        "created_at": "2025-01-01T00:00:00+00:00",
    }
    if material is not None:
        item["key"] = _b64(material)
    item.update(extra)
    return item


def test_file_create_is_private_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "kek" / "keyring.json"
    kr = FileKeyring.create(path)
    assert kr.provider == "file"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(KeyringError, match="already exists"):
        FileKeyring.create(path)
    assert path.read_bytes() == before
    doc = json.loads(before)
    assert doc["format"] == 1 and doc["primary"] == 1
    assert len(base64.b64decode(doc["versions"][0]["key"])) == 32
    kr.rotate()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lock = path.with_name("keyring.json.lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["keyring.json", "keyring.json.lock"]


def test_file_loads_a_valid_document(tmp_path: Path) -> None:
    kr = FileKeyring(_write(tmp_path / "k.json", json.dumps(_doc())))
    assert kr.primary() == 2
    assert states(kr) == {1: KekState.ACTIVE, 2: KekState.PRIMARY}
    assert kr.unwrap(1, kr.wrap(1, DEK, AAD), AAD) == DEK


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666])
def test_file_refuses_permissive_modes(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "k.json", json.dumps(_doc()), mode)
    with pytest.raises(ConfigError, match="accessible by other users") as err:
        FileKeyring(path)
    assert str(path) in str(err.value)
    assert _b64(KEY_A) not in str(err.value)


def test_file_refresh_refuses_a_file_that_became_readable(tmp_path: Path) -> None:
    path = _write(tmp_path / "k.json", json.dumps(_doc()))
    kr = FileKeyring(path)
    w = kr.wrap(2, DEK, AAD)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by other users"):
        kr.refresh()
    assert kr.unwrap(2, w, AAD) == DEK  # keeps serving what it had


def test_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        FileKeyring(tmp_path / "absent.json")


MALFORMED: list[tuple[str, Any, str]] = [
    ("not-json", "{not json", "not valid JSON"),
    ("not-utf8", b"\xff\xfe" + KEY_A, "not UTF-8"),
    ("not-object", "[1, 2]", "must be a JSON object"),
    ("unknown-field", _doc(keys=[]), "unknown top-level field"),
    ("no-format", {k: v for k, v in _doc().items() if k != "format"}, "missing 'format'"),
    ("bad-format", _doc(format=2), "unsupported format"),
    ("no-primary", {k: v for k, v in _doc().items() if k != "primary"}, "missing 'primary'"),
    ("primary-not-int", _doc(primary="2"), "'primary' must be a positive integer"),
    ("primary-bool", _doc(primary=True), "'primary' must be a positive integer"),
    ("primary-absent", _doc(primary=3), "primary version 3 is not among the versions"),
    ("primary-wrong-state", _doc(primary=1), "primary version 1 has state 'active'"),
    (
        "two-primaries",
        _doc(versions=[_entry(1, "primary"), _entry(2, "primary", KEY_B)]),
        "more than one version has state 'primary'",
    ),
    ("no-versions", _doc(versions=[]), "'versions' must be a non-empty list"),
    ("versions-not-list", _doc(versions={}), "'versions' must be a non-empty list"),
    ("entry-not-object", _doc(versions=["x"]), "versions[0] must be an object"),
    (
        "duplicate-version",
        _doc(versions=[_entry(2, "active"), _entry(2, "primary", KEY_B)]),
        "duplicate version 2",
    ),
    ("bad-version", _doc(versions=[_entry(0, "primary")]), "'version' must be a positive"),
    (
        "bad-state",
        _doc(versions=[_entry(1, "active"), _entry(2, "current", KEY_B)]),
        "'state' must be one of",
    ),
    (
        "unknown-entry-field",
        _doc(versions=[_entry(1, "active", kye="x"), _entry(2, "primary", KEY_B)]),
        "unknown field(s): kye",
    ),
    (
        "short-key",
        _doc(versions=[_entry(1, "active", KEY_A[:31]), _entry(2, "primary", KEY_B)]),
        "'key' must be 32 bytes, found 31",
    ),
    (
        "long-key",
        _doc(versions=[_entry(1, "active"), _entry(2, "primary", KEY_B + b"\x00")]),
        "'key' must be 32 bytes, found 33",
    ),
    (
        "bad-base64",
        _doc(versions=[_entry(1, "active"), _entry(2, "primary", None, key="*" + _b64(KEY_B))]),
        "'key' is not valid base64",
    ),
    (
        "missing-key",
        _doc(versions=[_entry(1, "active", None), _entry(2, "primary", KEY_B)]),
        "version 1: missing 'key'",
    ),
    (
        "retired-with-key",
        _doc(versions=[_entry(1, "retired"), _entry(2, "primary", KEY_B)]),
        "retired but still holds key material",
    ),
    (
        "bad-created-at",
        _doc(versions=[_entry(1, "active", created_at="yesterday"), _entry(2, "primary", KEY_B)]),
        "'created_at' is not an ISO 8601 timestamp",
    ),
    (
        "naive-created-at",
        _doc(
            versions=[
                _entry(1, "active", created_at="2025-01-01T00:00:00"),
                _entry(2, "primary", KEY_B),
            ]
        ),
        "'created_at' must include a UTC offset",
    ),
]


@pytest.mark.parametrize(("content", "problem"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])  # fmt: skip
def test_file_refuses_malformed(tmp_path: Path, content: Any, problem: str) -> None:
    raw = content if isinstance(content, str | bytes) else json.dumps(content)
    path = _write(tmp_path / "k.json", raw)
    with pytest.raises(KeyringError) as err:
        FileKeyring(path)
    message = str(err.value)
    assert problem in message
    assert str(path) in message
    for key in (KEY_A, KEY_B, KEY_A[:31], KEY_B + b"\x00"):
        assert _b64(key) not in message and key.hex() not in message


def test_file_retired_key_material_is_gone_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    kr = FileKeyring.create(path)
    [old_key] = _file_secrets(path)
    kr.rotate()
    kr.rotate()
    [_, key2, _] = _file_secrets(path)
    assert kr.retire_below(3) == [1, 2]
    raw = path.read_text()
    assert _b64(old_key) not in raw and _b64(key2) not in raw
    doc = json.loads(raw)
    retired = [v for v in doc["versions"] if v["state"] == "retired"]
    assert [v["version"] for v in retired] == [1, 2]
    assert all("key" not in v for v in retired)
    FileKeyring(path)  # and the result still loads
    assert not list(path.parent.glob("*.tmp"))


def test_file_wrapped_key_is_bound_to_its_version(tmp_path: Path) -> None:
    """Two versions holding the same key (a hand-edited file): a DEK wrapped under one still
    does not unwrap under the other, because the version is authenticated."""
    same = _doc(versions=[_entry(1, "active", KEY_A), _entry(2, "primary", KEY_A)])
    kr = FileKeyring(_write(tmp_path / "k.json", json.dumps(same)))
    wrapped = kr.wrap(1, DEK, AAD)
    with pytest.raises(UnwrapError):
        kr.unwrap(2, wrapped, AAD)
    assert kr.unwrap(1, wrapped, AAD) == DEK


def test_file_refresh_reloads_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    kr = FileKeyring.create(path)
    state = kr._state
    kr.refresh()
    assert kr._state is state  # unchanged file: no reload
    FileKeyring(path).rotate()
    kr.refresh()
    assert kr._state is not state and kr.primary() == 2


def test_file_errors_never_carry_key_material(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    kr = FileKeyring.create(path)
    kr.rotate()
    kr.retire_below(2)
    secrets = _file_secrets(path)
    errors: list[BaseException] = []
    for call in (
        lambda: kr.wrap(1, DEK, AAD),
        lambda: kr.wrap(7, DEK, AAD),
        lambda: kr.unwrap(1, b"x" * 60, AAD),
        lambda: kr.unwrap(2, b"x" * 60, AAD),
        lambda: kr.retire_below(3),
    ):
        with pytest.raises(KeyringError) as err:
            call()
        errors.append(err.value)
    for exc in errors:
        text = f"{exc} {exc.detail if isinstance(exc, KeyringError) else ''}"
        for secret in (*secrets, DEK):
            assert _b64(secret) not in text and secret.hex() not in text


# -- PKCS#11 provider ---------------------------------------------------------------------


@pytest.fixture
def hsm(softhsm: str, tmp_path: Path) -> Iterator[Any]:
    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring  # noqa: PLC0415

    lock = tmp_path / "hsm.lock"
    with Pkcs11Keyring.initialise(softhsm, TOKEN, PIN, lock_path=lock) as keyring:
        yield keyring


def _token_session(module: str, *, rw: bool = False) -> Any:
    """A session sharing the keyring's login (PKCS#11 login is per process)."""
    import pkcs11  # noqa: PLC0415

    return pkcs11.lib(module).get_token(token_label=TOKEN).open(rw=rw)


def test_pkcs11_keks_are_sensitive_and_not_extractable(hsm: Any, softhsm: str) -> None:
    import pkcs11  # noqa: PLC0415
    from pkcs11 import Attribute, KeyType, ObjectClass  # noqa: PLC0415

    hsm.rotate()
    session = _token_session(softhsm)
    try:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
        assert sorted(k[Attribute.LABEL] for k in keys) == [
            "securebroker-kek-v1",
            "securebroker-kek-v2",
        ]
        for key in keys:
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                key[Attribute.VALUE]  # reading the raw key must fail
            assert key[Attribute.SENSITIVE] and key[Attribute.ALWAYS_SENSITIVE]
            assert not key[Attribute.EXTRACTABLE] and key[Attribute.NEVER_EXTRACTABLE]
            assert key[Attribute.LOCAL]  # generated inside the token
            assert key[Attribute.TOKEN] and key[Attribute.PRIVATE]
            assert key[Attribute.ENCRYPT] and key[Attribute.DECRYPT]
            assert not key[Attribute.WRAP] and not key[Attribute.SIGN]
            assert key[Attribute.VALUE_LEN] == 32
            # nor can it be exported wrapped under another key
            wrapping = session.generate_key(KeyType.AES, 256, store=False)
            with pytest.raises(pkcs11.exceptions.PKCS11Error):
                wrapping.wrap_key(key)
            with pytest.raises(pkcs11.exceptions.PKCS11Error):
                key[Attribute.EXTRACTABLE] = True
    finally:
        session.close()


def test_pkcs11_records_live_in_the_token(hsm: Any, softhsm: str) -> None:
    from pkcs11 import Attribute, ObjectClass  # noqa: PLC0415

    hsm.rotate()
    hsm.retire_below(2)
    session = _token_session(softhsm)
    try:
        records = {
            o[Attribute.LABEL]: json.loads(o[Attribute.VALUE])
            for o in session.get_objects({Attribute.CLASS: ObjectClass.DATA})
        }
        keys = [
            o[Attribute.LABEL]
            for o in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
        ]
    finally:
        session.close()
    assert set(records) == {"securebroker-kek-v1", "securebroker-kek-v2"}
    assert records["securebroker-kek-v1"]["retired_at"] is not None
    assert records["securebroker-kek-v2"]["retired_at"] is None
    assert keys == ["securebroker-kek-v2"]  # the retired version's key object is destroyed


def test_pkcs11_initialise_is_idempotent_and_constructor_needs_a_kek(softhsm: str) -> None:
    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring  # noqa: PLC0415

    with pytest.raises(KeyringError, match="initialise"):
        Pkcs11Keyring(softhsm, TOKEN, PIN)
    with Pkcs11Keyring.initialise(softhsm, TOKEN, PIN) as first:
        assert first.primary() == 1
        with Pkcs11Keyring.initialise(softhsm, TOKEN, PIN) as again:
            assert again.primary() == 1
            assert [i.version for i in again.versions()] == [1]


def test_pkcs11_label_prefixes_are_independent(hsm: Any, softhsm: str) -> None:
    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring  # noqa: PLC0415

    with Pkcs11Keyring.initialise(softhsm, TOKEN, PIN, label_prefix="tenant-b") as other:
        other.rotate()
        assert other.primary() == 2
        hsm.refresh()
        assert hsm.primary() == 1
        with pytest.raises(UnwrapError):
            hsm.unwrap(1, other.wrap(1, DEK, AAD), AAD)


def test_pkcs11_refusals_name_the_problem_not_the_pin(hsm: Any, softhsm: str) -> None:
    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring  # noqa: PLC0415

    with pytest.raises(KeyringError, match="PIN rejected") as err:
        Pkcs11Keyring(softhsm, TOKEN, "987654")  # while another keyring holds the login
    assert "987654" not in str(err.value)
    with pytest.raises(KeyringError, match="no such token"):
        Pkcs11Keyring(softhsm, "no-such-token", PIN)
    with pytest.raises(KeyringError, match="cannot load PKCS#11 module"):
        Pkcs11Keyring("/nonexistent/libnothing.so", TOKEN, PIN)
    with pytest.raises(KeyringError, match="label prefix"):
        Pkcs11Keyring(softhsm, TOKEN, PIN, label_prefix="bad prefix!")


def test_pkcs11_wrong_pin_on_first_login(softhsm: str) -> None:
    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring  # noqa: PLC0415

    with pytest.raises(KeyringError, match="PIN rejected") as err:
        Pkcs11Keyring.initialise(softhsm, TOKEN, "987654")
    assert "987654" not in str(err.value)


def test_pkcs11_stale_handle_after_retire_elsewhere(hsm: Any, softhsm: str) -> None:
    """Another process retires a version this instance still holds a handle for."""
    hsm.rotate()
    w1 = hsm.wrap(1, DEK, AAD)
    code = (
        "from pathlib import Path as P; "
        "from securebroker.crypto.pkcs11keyring import Pkcs11Keyring as K; "
        f"print(K({softhsm!r}, {TOKEN!r}, {PIN!r}, lock_path=P({str(hsm.lock_path)!r}))"
        ".retire_below(2))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert out.stdout.strip() == "[1]"
    with pytest.raises(UnwrapError):
        hsm.unwrap(1, w1, AAD)
    assert states(hsm)[1] is KekState.RETIRED  # re-read on the stale handle


def test_pkcs11_module_is_imported_lazily() -> None:
    code = (
        "import sys, securebroker.crypto.pkcs11keyring, securebroker.crypto.filekeyring; "
        "print('pkcs11' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert out.stdout.strip() == "False"


def test_pkcs11_default_lock_file_is_private(softhsm: str, private_tmpdir: Path) -> None:
    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring  # noqa: PLC0415

    with Pkcs11Keyring.initialise(softhsm, TOKEN, PIN) as keyring:
        assert keyring.lock_path.parent == private_tmpdir
        assert keyring.lock_path.name.startswith(f"securebroker-kek-{os.geteuid()}-")
        keyring.rotate()
        assert stat.S_IMODE(keyring.lock_path.stat().st_mode) == 0o600
        with Pkcs11Keyring.initialise(softhsm, TOKEN, PIN, label_prefix="other") as other_prefix:
            assert other_prefix.lock_path != keyring.lock_path


def test_pkcs11_orphan_key_is_never_used(hsm: Any, softhsm: str) -> None:
    """A key object without a record (a rotation that crashed before writing it) is skipped:
    never primary, never listed, its version number never reused, and left alone by
    retire_below."""
    from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass  # noqa: PLC0415

    session = _token_session(softhsm, rw=True)
    try:
        session.generate_key(
            KeyType.AES,
            256,
            id=b"orphan-orphan-16",
            label="securebroker-kek-v2",
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
        )
    finally:
        session.close()
    hsm.refresh()
    assert states(hsm) == {1: KekState.PRIMARY}
    with pytest.raises(KeyringError, match="unknown"):
        hsm.wrap(2, DEK, AAD)
    assert hsm.rotate() == 3
    assert states(hsm) == {1: KekState.ACTIVE, 3: KekState.PRIMARY}
    assert hsm.retire_below(3) == [1]
    session = _token_session(softhsm)
    try:
        labels = sorted(
            o[Attribute.LABEL]
            for o in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
        )
    finally:
        session.close()
    assert labels == ["securebroker-kek-v2", "securebroker-kek-v3"]


def test_pkcs11_version_claimed_twice_keeps_both_keys(hsm: Any, softhsm: str) -> None:
    """Should two hosts ever both claim a version (a token whose object search lags), the
    version has two recorded keys: DEKs wrapped under either unwrap, wrap picks the lowest
    CKA_ID, retire destroys both."""
    import pkcs11  # noqa: PLC0415
    from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass  # noqa: PLC0415

    from securebroker.crypto.pkcs11keyring import APPLICATION, bound_aad  # noqa: PLC0415

    def gcm(iv: bytes) -> dict[str, Any]:
        return {
            "mechanism": pkcs11.Mechanism.AES_GCM,
            "mechanism_param": pkcs11.GCMParams(iv, bound_aad(2, AAD), 128),
        }

    hsm.rotate()
    before = hsm.wrap(2, DEK, AAD)
    rival_id = bytes(16)  # the lowest possible CKA_ID
    record = {
        "format": 1,
        "version": 2,
        "key_id": rival_id.hex(),
        "created_at": "2025-01-01T00:00:00+00:00",
        "retired_at": None,
    }
    session = _token_session(softhsm, rw=True)
    try:
        rival = session.generate_key(
            KeyType.AES,
            256,
            id=rival_id,
            label="securebroker-kek-v2",
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.LABEL: "securebroker-kek-v2",
                Attribute.APPLICATION: APPLICATION,
                Attribute.VALUE: json.dumps(record).encode(),
            }
        )
        iv = os.urandom(12)
        by_rival = iv + rival.encrypt(DEK, **gcm(iv))
    finally:
        session.close()
    hsm.refresh()
    assert states(hsm) == {1: KekState.ACTIVE, 2: KekState.PRIMARY}
    assert hsm.versions()[1].created_at.year == 2025  # the earliest record wins
    assert hsm.unwrap(2, by_rival, AAD) == DEK
    assert hsm.unwrap(2, before, AAD) == DEK
    after = hsm.wrap(2, DEK, AAD)
    session = _token_session(softhsm)
    try:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, id=rival_id)
        assert key.decrypt(after[12:], **gcm(after[:12])) == DEK
    finally:
        session.close()
    hsm.rotate()
    assert hsm.retire_below(3) == [1, 2]
    with pytest.raises(UnwrapError):
        hsm.unwrap(2, by_rival, AAD)
    session = _token_session(softhsm)
    try:
        left = [o[Attribute.LABEL] for o in session.get_objects({Attribute.ID: rival_id})]
    finally:
        session.close()
    assert left == []
