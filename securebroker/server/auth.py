"""Who is calling, and may they? The seam every front door goes through.

Transport identity comes from the client certificate (mutual TLS). Bearer tokens and topic ACLs
plug in behind ``Authenticator`` and ``Authorizer``; until policies are configured the broker
runs with ``CertificateAuthenticator`` (identity = certificate principal) and ``AllowAll``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from securebroker.tls import PeerIdentity


class Action(enum.StrEnum):
    PUBLISH = "publish"
    CONSUME = "consume"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the certificate it connected with and the token it presented."""

    name: str
    peer: PeerIdentity
    subject: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    token_expires_at: datetime | None = None


class Authenticator(Protocol):
    async def authenticate(self, peer: PeerIdentity, token: str | None) -> Principal:
        """Return the principal or raise ``AuthenticationError`` (opaque to the peer)."""
        ...


class Authorizer(Protocol):
    def authorize(self, principal: Principal, action: Action, resource: str) -> None:
        """Return if allowed; raise ``AuthorizationError`` otherwise."""
        ...


class CertificateAuthenticator:
    async def authenticate(self, peer: PeerIdentity, token: str | None) -> Principal:
        return Principal(name=peer.principal, peer=peer)


class AllowAll:
    def authorize(self, principal: Principal, action: Action, resource: str) -> None:
        return None
