"""A private SoftHSM2 token per test, for the PKCS#11 keyring (tests/integration/conftest.py
registers the ``softhsm`` fixture).

SoftHSM2 is a test prerequisite, installed by ``scripts/_venv.sh``: when it is missing the tests
that need it FAIL (they do not skip), so CI cannot silently lose them.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PIN = "1234"
SO_PIN = "0000"
TOKEN = "sb-test"
SUBPROCESS_TIMEOUT = 120

SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",  # Debian, Ubuntu
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",  # Fedora, RHEL
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",  # source builds, FreeBSD
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",  # macOS
)

INSTALL_HINT = (
    "SoftHSM2 is required for the PKCS#11 keyring tests: run scripts/_venv.sh as root on "
    "Debian (it installs the softhsm2 package), or install SoftHSM2 and set SOFTHSM2_MODULE "
    "to libsofthsm2.so"
)


def find_softhsm_module() -> str | None:
    env = os.environ.get("SOFTHSM2_MODULE")
    if env:
        return env if os.path.exists(env) else None
    for candidate in SOFTHSM_MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    found = sorted(glob.glob("/usr/lib/*/softhsm/libsofthsm2.so"))
    return found[0] if found else None


@pytest.fixture(name="softhsm")
def softhsm_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private SoftHSM2 configuration and token directory with one fresh token; yields the
    module path. The library is finalised afterwards so the next test starts clean."""
    module = find_softhsm_module()
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        pytest.fail(INSTALL_HINT)
    try:
        import pkcs11  # noqa: PLC0415
    except ImportError:
        pytest.fail("python-pkcs11 is missing: run scripts/_venv.sh (it installs '.[test]')")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN, "--so-pin", SO_PIN, "--pin", PIN],
        check=True,
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    yield module
    # SoftHSM reads its configuration and token list in C_Initialize: finalise so the next test
    # (another token directory) initialises afresh. Every keyring is closed by now.
    from securebroker.crypto import pkcs11keyring  # noqa: PLC0415

    assert not pkcs11keyring._REGISTRY, "a Pkcs11Keyring was left open"
    pkcs11.lib(module).finalize()
