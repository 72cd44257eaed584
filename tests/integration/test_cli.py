"""The ``securebroker`` command as a newcomer uses it: ``dev`` in one process, the CLI in others.

``securebroker dev`` runs as a subprocess (its own embedded PostgreSQL, dev PKI and listener on a
free port); the client commands run as further subprocesses against it. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: Generous: a first ``dev`` run initialises a PostgreSQL data directory.
START_TIMEOUT = 120.0
COMMAND_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def _command() -> list[str]:
    script = Path(sys.executable).parent / "securebroker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "securebroker.cli"]


@dataclass
class DevBroker:
    proc: asyncio.subprocess.Process
    port: int
    certs: Path
    cwd: Path
    banner: str

    def tls(self, identity: str) -> list[str]:
        return [
            "--port",
            str(self.port),
            "--cert",
            str(self.certs / f"{identity}.pem"),
            "--key",
            str(self.certs / f"{identity}.key"),
            "--ca",
            str(self.certs / "ca.pem"),
        ]

    async def run(
        self,
        *args: str,
        identity: str | None = "dev-client",
        stdin: bytes | None = None,
    ) -> tuple[int, str, str]:
        """Run a CLI command with this broker's port and ``identity``'s TLS files (if any)."""
        proc = await asyncio.create_subprocess_exec(
            *_command(),
            *args,
            *(self.tls(identity) if identity else ()),
            cwd=self.cwd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                out, err = await proc.communicate(stdin or b"")
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *args: str, identity: str | None = "dev-client") -> str:
        code, out, err = await self.run(*args, identity=identity)
        assert code == 0, (args, out, err)
        assert "Traceback" not in err
        return out

    async def ok_json(self, *args: str, identity: str = "dev-admin") -> Any:
        return json.loads(await self.ok(*args, "--json", identity=identity))


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise


@pytest.fixture
def dev_home() -> Iterator[Path]:
    """``--home`` (and so the PostgreSQL data directory) outside pytest's ``tmp_path``.

    The embedded server runs as its own system user, which must reach the data directory;
    pytest keeps its base temporary directory private (mode 0700), re-applying that whenever a
    pytest session starts, so a data directory under ``tmp_path`` can become unreachable.
    """
    home = Path(tempfile.mkdtemp(prefix="sb-test-dev-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
async def dev_broker(tmp_path: Path, dev_home: Path) -> AsyncIterator[DevBroker]:
    certs = tmp_path / "certs"
    err_log = tmp_path / "dev-stderr.log"
    with err_log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *_command(),
            "dev",
            "--home",
            str(dev_home),
            "--certs",
            str(certs),
            "--port",
            "0",
            cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(START_TIMEOUT):
            while not any("Stop with Ctrl-C" in line for line in lines):
                line = (await proc.stdout.readline()).decode()
                assert line, f"dev exited early:\n{''.join(lines)}\n{err_log.read_text()}"
                lines.append(line)
        banner = "".join(lines)
        match = re.search(r"native listener\s+127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        port = int(match.group(1))
        assert port != 0
        yield DevBroker(proc, port, certs, tmp_path, banner)
    finally:
        with contextlib.suppress(ProcessLookupError):
            await _stop(proc)


async def test_cli_against_dev_broker(dev_broker: DevBroker) -> None:
    d = dev_broker
    assert (d.certs / "ca.pem").exists() and (d.certs / "dev-admin.pem").exists()
    assert str(d.certs) in d.banner  # the banner names the certificates actually in use
    # The quick-start commands work as printed (they carry the port and the certificates).
    printed = [
        shlex.split(line)
        for line in d.banner.splitlines()
        if line.strip().startswith("securebroker publish")
    ]
    assert len(printed) == 1 and printed[0][0] == "securebroker", d.banner
    banner_id = (await d.ok(*printed[0][1:], identity=None)).strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", banner_id), banner_id

    # publish: an id, then the same id as a duplicate, then a conflict as one error line
    first = (await d.ok("publish", "demo.orders", "--data", '{"order": 42}', "-k", "k1")).strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", first), first
    again = (await d.ok("publish", "demo.orders", "--data", '{"order": 42}', "-k", "k1")).strip()
    assert again == f"{first} (duplicate)"
    code, out, err = await d.run("publish", "demo.orders", "--data", "other", "-k", "k1")
    assert code != 0 and out == ""
    assert err.startswith("error: idempotency_conflict:") and err.count("\n") == 1, err
    # stdin is the payload when --data is absent
    code, piped, err = await d.run(
        "publish", "demo.orders", "-k", "k2", "--attr", "region=eu", stdin=b"from stdin"
    )
    assert code == 0, err

    # consume both, as JSON lines
    out = await d.ok("consume", "demo.orders.worker", "--count", "3", "--json")
    got = [json.loads(line) for line in out.splitlines()]
    assert [(m["id"], m["payload"], m["attempt"]) for m in got] == [
        (banner_id, '{"order": 42}', 1),
        (first, '{"order": 42}', 1),
        (piped.strip(), "from stdin", 1),
    ]
    assert got[2]["attributes"] == {"region": "eu"} and got[0]["topic"] == "demo.orders"

    # admin commands (as dev-admin)
    topics = await d.ok_json("topics", "list")
    assert [t["name"] for t in topics] == ["demo.orders"]
    assert topics[0]["subscriptions"] == ["demo.orders.worker"]
    described = await d.ok_json("subscriptions", "describe", "demo.orders.worker")
    assert described["topic"] == "demo.orders"
    assert described["counts"] == {"ready": 0, "delayed": 0, "leased": 0, "dead": 0}
    table = await d.ok("subscriptions", "list", identity="dev-admin")
    assert table.splitlines()[0].split() == ["NAME", "TOPIC", "MAX_ATTEMPTS", "LEASE_SECONDS"]
    assert "demo.orders.worker" in table

    # dead letters: a subscription that gives up after one attempt
    created = await d.ok_json(
        "subscriptions",
        "create",
        "demo.orders.audit",
        "--topic",
        "demo.orders",
        "--max-attempts",
        "1",
    )
    assert created["max_attempts"] == 1
    poison = (await d.ok("publish", "demo.orders", "--data", "poison", "-k", "p1")).strip()
    out = await d.ok("consume", "demo.orders.audit", "--count", "1", "--nack", "--json")
    assert json.loads(out)["id"] == poison
    dead = await d.ok_json("dlq", "list", "demo.orders.audit")
    assert [(x["message_id"], x["reason"]) for x in dead] == [(poison, "max_attempts")]
    assert "nacked from the CLI" in dead[0]["last_error"]
    assert await d.ok_json("dlq", "redrive", "demo.orders.audit") == {"redriven": 1}
    assert await d.ok_json("dlq", "list", "demo.orders.audit") == []
    assert (
        await d.ok("dlq", "list", "demo.orders.audit", identity="dev-admin")
    ).strip() == "(none)"

    # errors: one line starting with "error:", non-zero exit, no traceback
    for args in (
        ("topics", "describe", "no.such.topic"),
        ("subscriptions", "describe", "no.such.sub"),
        ("dlq", "list", "no.such.sub"),
    ):
        code, out, err = await d.run(*args, identity="dev-admin")
        assert code != 0 and out == "", (args, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert "Traceback" not in err
    code, _, err = await d.run("publish", "demo.orders", "--data", "x", identity="no-such-identity")
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "not found" in err

    # graceful stop on SIGTERM: exit status 0, in bounded time
    assert await _stop(d.proc) == 0
    code, _, err = await d.run("topics", "list", identity="dev-admin")
    assert code != 0 and err.startswith("error: unavailable:") and err.count("\n") == 1, err
