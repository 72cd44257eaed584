"""Key-encryption keys (KEKs): the one small interface every keyring provider implements.

A keyring holds numbered KEK versions (1, 2, …). Exactly one is *primary*: new data keys (DEKs)
are wrapped under it. Older versions stay usable for unwrapping until they are *retired*
(``retire_below``), which destroys their key material. KEKs never leave the keyring in a form the
database could store; the broker only ever asks the keyring to wrap or unwrap a DEK.

Providers:
- ``securebroker.crypto.filekeyring.FileKeyring``: a local JSON file (mode 0600, refused when
  group/others may read it), for development and single-host deployments.
- ``securebroker.crypto.pkcs11keyring.Pkcs11Keyring``: a PKCS#11 HSM (tested against SoftHSM2);
  KEKs are generated inside the token as non-extractable AES keys, wrap/unwrap run inside it.
- A cloud KMS provider implements the same methods (``wrap``/``unwrap`` map to the KMS's
  encrypt/decrypt with the AAD as encryption context; ``rotate`` creates a key version).

Wrapping is authenticated encryption with associated data: the AAD passed by the caller binds a
wrapped DEK to its id and scope, so a wrapped DEK copied to another row does not unwrap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from securebroker.errors import InternalError


class KeyringError(InternalError):
    """A keyring operation failed. Messages name versions and files, never key material. On the
    wire it is an opaque ``internal`` error (crypto failures are specific only in logs/audit)."""

    code = "keyring"


class UnwrapError(KeyringError):
    """Unwrapping failed: wrong version, tampered wrapped key, or wrong AAD (opaque on purpose)."""

    code = "unwrap_failed"


class KekState(enum.StrEnum):
    PRIMARY = "primary"  # wraps new DEKs; unwraps
    ACTIVE = "active"  # unwraps only
    RETIRED = "retired"  # key material destroyed: unwraps nothing


@dataclass(frozen=True, slots=True)
class KekInfo:
    version: int
    state: KekState
    created_at: datetime


class Keyring(Protocol):
    #: short provider name for logs and ``keys list`` ("file", "pkcs11", …)
    provider: str

    def primary(self) -> int:
        """The version new DEKs are wrapped under."""
        ...

    def versions(self) -> list[KekInfo]:
        """Every version ever created, oldest first (retired ones included, as a record)."""
        ...

    def wrap(self, version: int, dek: bytes, aad: bytes) -> bytes:
        """Encrypt ``dek`` under KEK ``version``, authenticating ``aad``. Raises
        ``KeyringError`` for an unknown or retired version."""
        ...

    def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        """Inverse of ``wrap``; ``UnwrapError`` if anything does not match."""
        ...

    def rotate(self) -> int:
        """Create a new version and make it primary; return it. Online: existing versions keep
        unwrapping."""
        ...

    def retire_below(self, version: int) -> list[int]:
        """Destroy the key material of every non-retired version < ``version`` (never the
        primary); return the versions retired. Callers check first that no DEK depends on
        them."""
        ...

    def refresh(self) -> None:
        """Pick up changes made by another process (``keys rotate`` from the CLI)."""
        ...
