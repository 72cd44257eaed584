"""Opening the configured keyring, and the operator's key operations (``securebroker keys …``).

The operations run on the operator's host against the keyring and the database directly (like
``migrate``), online: running brokers learn about changes through ``NOTIFY sb_keys`` and keep
serving. Each operation is idempotent or resumable, so a crash halfway is fixed by running it
again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from securebroker.audit.record import Event
from securebroker.clock import Clock, SystemClock
from securebroker.config import EncryptionConfig
from securebroker.crypto.envelope import Envelope, dek_aad
from securebroker.crypto.keyring import Keyring, KeyringError
from securebroker.crypto.keystore import KeyStore, StoredDek
from securebroker.errors import ConfigError, ValidationError
from securebroker.secrets import check_private

log = logging.getLogger(__name__)


def open_keyring(cfg: EncryptionConfig, *, create: bool = False) -> Keyring | None:
    """The keyring ``cfg`` names; None for ``keyring = "none"``. ``create`` makes a new one
    (version 1) if there is none yet (``securebroker keys init``)."""
    if cfg.keyring == "none":
        return None
    if cfg.keyring == "file":
        from securebroker.crypto.filekeyring import FileKeyring  # noqa: PLC0415

        if not cfg.keyring_file:
            raise ConfigError('encryption.keyring_file: required for keyring = "file"')
        path = Path(cfg.keyring_file)
        if create and not path.exists():
            return FileKeyring.create(path, setting="encryption.keyring_file")
        return FileKeyring(path, setting="encryption.keyring_file")
    from securebroker.crypto.pkcs11keyring import Pkcs11Keyring  # noqa: PLC0415

    for key in ("pkcs11_module", "pkcs11_token", "pkcs11_pin_file"):
        if not getattr(cfg, key):
            raise ConfigError(f'encryption.{key}: required for keyring = "pkcs11"')
    pin_file = Path(cfg.pkcs11_pin_file)
    check_private(pin_file, setting="encryption.pkcs11_pin_file")
    pin = pin_file.read_text(encoding="utf-8").strip()
    opener = Pkcs11Keyring.initialise if create else Pkcs11Keyring
    return opener(cfg.pkcs11_module, cfg.pkcs11_token, pin, label_prefix=cfg.pkcs11_label_prefix)


def build_envelope(
    cfg: EncryptionConfig, keyring: Keyring, keys: KeyStore, clock: Clock | None = None
) -> Envelope:
    return Envelope(
        keyring,
        keys,
        scope_attribute=cfg.scope_attribute,
        max_messages=cfg.dek_max_messages,
        max_age=timedelta(hours=cfg.dek_max_age_hours),
        cache_size=cfg.dek_cache_size,
        cache_ttl=timedelta(seconds=cfg.dek_cache_seconds),
        clock=clock,
    )


@dataclass(frozen=True)
class KeyRow:
    version: int
    state: str
    created_at: str
    live_deks: int
    destroyed_deks: int


async def list_keys(keyring: Keyring, keys: KeyStore) -> list[KeyRow]:
    usage = {u.kek_version: u for u in await keys.usage()}
    rows = []
    for info in keyring.versions():
        u = usage.get(info.version)
        rows.append(
            KeyRow(
                info.version,
                str(info.state),
                info.created_at.isoformat(timespec="seconds"),
                u.live if u else 0,
                u.destroyed if u else 0,
            )
        )
    return rows


async def rotate(keyring: Keyring, keys: KeyStore) -> int:
    """A new primary KEK version; brokers wrap new DEKs under it from their next rollover, which
    the NOTIFY makes immediate."""
    version = keyring.rotate()
    keys.record_kek(Event.KEY_ROTATED, version, SystemClock().now(), primary=True)
    await keys.notify("rotate")
    log.info("KEK rotated: version %d is primary", version)
    return version


Progress = Callable[[int, int], None]


async def rewrap(
    keyring: Keyring, keys: KeyStore, *, batch: int = 100, progress: Progress | None = None
) -> int:
    """Rewrap every live DEK wrapped under an older KEK version to the primary, in batches.

    Each DEK is updated only if nobody changed it meanwhile (compare-and-set on its version),
    so concurrent runs and a crash halfway are harmless: run it again to finish. Payloads are
    never re-encrypted: only the wrapped DEK bytes change.
    """
    keyring.refresh()
    primary = keyring.primary()
    done = 0
    remaining = await keys.live_below(primary)
    while True:
        todo = await keys.rewrap_batch(primary, batch)
        if not todo:
            break
        for dek in todo:
            assert dek.wrapped is not None
            aad = dek_aad(dek.id, dek.scope)
            key = keyring.unwrap(dek.kek_version, dek.wrapped, aad)
            new = StoredDek(dek.id, dek.scope, primary, keyring.wrap(primary, key, aad))
            if await keys.replace_wrapped(new, dek.kek_version):
                done += 1
        if progress is not None:
            progress(done, max(remaining, done))
    return done


async def retire(keyring: Keyring, keys: KeyStore, below: int) -> list[int]:
    keyring.refresh()
    if below > keyring.primary():
        raise ValidationError(
            f"--below {below} would retire the primary KEK version {keyring.primary()}"
        )
    waiting = await keys.live_below(below)
    if waiting:
        raise ValidationError(
            f"{waiting} data key(s) still depend on KEK versions below {below}; "
            "run `securebroker keys rewrap` first"
        )
    retired = keyring.retire_below(below)
    now = SystemClock().now()
    for v in retired:
        keys.record_kek(Event.KEY_RETIRED, v, now)
    await keys.notify("retire")
    log.info("KEK versions retired: %s", retired)
    return retired


@dataclass(frozen=True)
class DestroyReport:
    scope: str
    deks_destroyed: int
    new_primary: int | None
    rewrapped: int
    retired: list[int]


async def destroy_scope(
    keyring: Keyring,
    keys: KeyStore,
    scope: str,
    *,
    clock: Clock | None = None,
    seal_backups: bool = True,
    progress: Progress | None = None,
) -> DestroyReport:
    """Crypto-shred ``scope``: drop its wrapped DEKs (running brokers forget them at once).

    With ``seal_backups`` (the default), also make every *old copy* of those wrapped DEKs useless
    — in WAL, in dead tuples, in database backups — by rotating the KEK, rewrapping every other
    scope's DEKs to the new version and retiring all older versions: no KEK that could unwrap
    the destroyed DEKs exists any more, anywhere.
    """
    if not scope or ":" not in scope:
        raise ValidationError("scope must look like topic:<name> or <attribute>:<value>")
    now = (clock or SystemClock()).now()
    n = await keys.destroy_scope(scope, now)
    log.warning("scope %s destroyed: %d data key(s) dropped", scope, n)
    if not seal_backups:
        return DestroyReport(scope, n, None, 0, [])
    version = await rotate(keyring, keys)
    rewrapped = 0
    for _ in range(10):  # a broker may wrap one more DEK under the old primary before the NOTIFY
        rewrapped += await rewrap(keyring, keys, progress=progress)
        if await keys.live_below(version) == 0:
            break
    retired = await retire(keyring, keys, version)
    return DestroyReport(scope, n, version, rewrapped, retired)


__all__ = [
    "DestroyReport",
    "KeyRow",
    "KeyringError",
    "build_envelope",
    "destroy_scope",
    "list_keys",
    "open_keyring",
    "retire",
    "rewrap",
    "rotate",
]
