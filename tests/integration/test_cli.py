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
from dataclasses import dataclass, field
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
    home: Path
    log: list[str] = field(default_factory=list)
    logged: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_log(self, needle: str, after: int = 0) -> str:
        """Wait (bounded) for a server log line containing ``needle``, from line ``after`` on."""
        async with asyncio.timeout(COMMAND_TIMEOUT):
            while True:
                for line in self.log[after:]:
                    if needle in line:
                        return line
                self.logged.clear()
                await self.logged.wait()

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
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log: list[str] = []
    logged = asyncio.Event()

    async def read_stderr() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.append(line.decode(errors="replace"))
            logged.set()

    reader = asyncio.ensure_future(read_stderr())
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(START_TIMEOUT):
            while not any("Stop with Ctrl-C" in line for line in lines):
                line = (await proc.stdout.readline()).decode()
                assert line, f"dev exited early:\n{''.join(lines)}\n{''.join(log)}"
                lines.append(line)
        banner = "".join(lines)
        match = re.search(r"native listener\s+127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        port = int(match.group(1))
        assert port != 0
        yield DevBroker(proc, port, certs, tmp_path, banner, dev_home, log, logged)
    finally:
        with contextlib.suppress(ProcessLookupError):
            await _stop(proc)
        await reader


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

    # the audit trail of the first message, and an export that verifies offline against the
    # public key `dev` wrote beside its signing key
    trail = await d.ok_json("audit", "trail", first)
    assert [r["event"] for r in trail] == ["published", "deduplicated", "delivered", "acked"]
    assert trail[0]["actor_cert"] == "spiffe://securebroker.dev/dev-client"
    assert trail[0]["actor_sub"] == "dev-client"
    bundle = d.cwd / "audit.jsonl"
    await d.ok("audit", "export", "-o", str(bundle), identity="dev-admin")
    verified = await d.ok(
        "audit", "verify", str(bundle), "--public-key", str(d.home / "audit-signing.pub"),
        identity=None,
    )  # fmt: skip
    assert "result: OK, no tampering or loss found" in verified, verified
    assert "(pinned)" in verified, verified

    # graceful stop on SIGTERM: exit status 0, in bounded time
    assert await _stop(d.proc) == 0
    code, _, err = await d.run("topics", "list", identity="dev-admin")
    assert code != 0 and err.startswith("error: unavailable:") and err.count("\n") == 1, err


DENY_DEMO = """
[[rules]]
id = "freeze-demo"
effect = "deny"
actions = ["publish"]
topics = ["demo.#"]
any_principal = true
"""


async def test_dev_broker_enforces_tokens_and_reloads_policy(dev_broker: DevBroker) -> None:
    """``dev`` runs the production auth path: bound tokens minted by the CLI, the dev policy,
    opaque refusals with specific server-side reasons, and policy reloads on SIGHUP that
    validate before they take effect."""
    d = dev_broker
    ok = ("publish", "demo.orders", "--data", "x")
    assert (await d.ok(*ok)).strip()

    # a garbage token: opaque error for the client, specific reason in the server log
    mark = len(d.log)
    code, out, err = await d.run(*ok, "--token", "not-a-jwt")
    assert code != 0 and out == ""
    assert err == "error: unauthenticated: authentication failed\n", err
    assert "malformed token" in await d.wait_log("authentication failed: malformed token", mark)

    # a valid token for a subject the policy does not grant: forbidden, and logged as denied
    cert = str(d.certs / "dev-client.pem")
    intruder = (
        await d.ok(
            "token", "mint", "-s", "intruder", "--bind-cert", cert,
            "--signing-key", str(d.certs / "jwt-signing.key"), identity=None,
        )
    ).strip()  # fmt: skip
    mark = len(d.log)
    code, _, err = await d.run(*ok, "--token", intruder)
    assert code != 0 and err.startswith("error: forbidden: publish on topic 'demo.orders'"), err
    assert "no rule grants publish" in await d.wait_log("denied intruder", mark)

    # the dev-client's token, bound to dev-client, presented with dev-admin's certificate
    client_token = (
        await d.ok(
            "token", "mint", "-s", "dev-client", "--bind-cert", cert,
            "--signing-key", str(d.certs / "jwt-signing.key"), identity=None,
        )
    ).strip()  # fmt: skip
    mark = len(d.log)
    code, _, err = await d.run(*ok, "--token", client_token, identity="dev-admin")
    assert code != 0 and "authentication failed" in err
    await d.wait_log("bound to another certificate", mark)

    # a broken policy file is rejected on SIGHUP and the old policy stays in force
    policy = d.home / "policy" / "dev.toml"
    original = policy.read_text()
    policy.write_text(original + "\n[[rules]]\nid = broken\n")
    mark = len(d.log)
    d.proc.send_signal(signal.SIGHUP)
    line = await d.wait_log("policy not reloaded", mark)
    assert "dev.toml" in line
    assert (await d.ok(*ok)).strip()

    # a valid change takes effect on SIGHUP without a restart
    policy.write_text(original + DENY_DEMO)
    mark = len(d.log)
    d.proc.send_signal(signal.SIGHUP)
    await d.wait_log("policy reloaded: 3 rule(s)", mark)
    code, _, err = await d.run(*ok)
    assert code != 0 and err.startswith("error: forbidden:"), err
    # ...and reverting it through the file watcher alone (no signal) restores access
    policy.write_text(original)
    mark = len(d.log)
    await d.wait_log("policy reloaded: 2 rule(s)", mark)
    assert (await d.ok(*ok)).strip()

    # all of it is in the audit trail, which the dev admin may search with the CLI
    failed = await audit_search(d, "authentication_failed", 2)
    assert any("malformed token" in r["detail"]["reason"] for r in failed), failed
    assert any("bound to another certificate" in r["detail"]["reason"] for r in failed), failed
    assert all(r["origin_addr"].startswith("127.0.0.1:") for r in failed)
    denied = await audit_search(d, "authorization_denied", 2)
    assert [(r["actor_sub"], r["topic"]) for r in denied] == [
        ("intruder", "demo.orders"),  # no rule grants it
        ("dev-client", "demo.orders"),  # the freeze-demo rule, while it was in force
    ]
    assert "freeze-demo" in denied[1]["detail"]["reason"]
    reloads = await audit_search(d, "policy_reloaded", 3)
    assert [r["outcome"] for r in reloads] == ["failure", "success", "success"]
    assert "dev.toml" in reloads[0]["detail"]["error"]


async def audit_search(d: DevBroker, event: str, at_least: int) -> list[dict[str, Any]]:
    """``audit search --event EVENT`` until it returns ``at_least`` records: security events
    are written by the broker's background writer just after they happen. Bounded by
    START_TIMEOUT; each round is a whole CLI run against the broker."""
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            found: list[dict[str, Any]] = await d.ok_json("audit", "search", "--event", event)
            if len(found) >= at_least:
                return found
