"""``securebroker audit``: the auditor's commands.

``verify`` needs no database and no broker: it checks an export bundle offline. Exit status:
0 when the bundle verifies, 1 when problems (tampering, loss) are found, 2 when the input cannot
be read (one line on stderr, never a traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click

from securebroker.audit.bundle import read_bundle
from securebroker.audit.checkpoint import PUBLIC_KEY_BYTES, public_key_from_pem
from securebroker.audit.verify import verify_bundle
from securebroker.errors import BrokerError

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_UNREADABLE = 2
MAX_KEY_FILE_BYTES = 64 * 1024


@click.group("audit")
def audit() -> None:
    """Audit trail: verify exports (more subcommands need a running broker)."""


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_UNREADABLE)


def parse_public_key(value: str) -> bytes:
    """A raw 32-byte Ed25519 public key from hex, or from a file holding a PEM public key or hex.
    Raises ``click.BadParameter`` naming what is wrong (never echoing file contents)."""
    text = value.strip()
    if len(text) == 2 * PUBLIC_KEY_BYTES and not Path(value).exists():
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(
            f"{value!r} is neither {2 * PUBLIC_KEY_BYTES} hex digits nor a readable file"
        )
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise click.BadParameter(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise click.BadParameter(f"{path}: too large to be a public key file")
    if b"-----BEGIN" in data:
        if b"PRIVATE KEY" in data:
            raise click.BadParameter(
                f"{path} holds a private key; pass the public key (never give auditors the "
                "signing key)"
            )
        try:
            return public_key_from_pem(data, source=str(path))
        except BrokerError as exc:
            raise click.BadParameter(str(exc)) from None
    try:
        raw = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise click.BadParameter(
            f"{path} holds neither a PEM public key nor a hex-encoded raw key"
        ) from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise click.BadParameter(
            f"{path}: a raw Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, found {len(raw)}"
        )
    return raw


@audit.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    metavar="FILE|HEX",
    help="Trusted checkpoint signing key: hex of the raw 32-byte Ed25519 key, or a file holding "
    "a PEM public key or that hex. Repeatable. Without it, keys in the bundle are accepted and "
    "their ids are printed for you to compare.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_cmd(bundle: Path, public_keys: tuple[str, ...], as_json: bool) -> None:
    """Verify an audit export BUNDLE offline (no database, no broker).

    Exit status: 0 verified, 1 problems found (tampering or loss), 2 unreadable input.
    """
    trusted: list[bytes] | None = None
    if public_keys:
        trusted = []
        for value in public_keys:
            try:
                trusted.append(parse_public_key(value))
            except click.BadParameter as exc:
                _fail(f"--public-key: {exc.message}")
    try:
        data = read_bundle(bundle)
    except BrokerError as exc:
        _fail(f"{exc.code}: {exc}")
    report = verify_bundle(data, trusted)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.format_text(), nl=False)
    sys.exit(EXIT_OK if report.ok else EXIT_PROBLEMS)
