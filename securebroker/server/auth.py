"""Who is calling, and may they? The seam every front door goes through.

Transport identity comes from the client certificate (mutual TLS). Bearer tokens are verified by
an ``Authenticator`` (``securebroker.authz.tokens.JwtAuthenticator`` in a running broker) at HELLO
and AUTH; every front door asks one ``Authorizer`` (``securebroker.authz.PolicyAuthorizer``)
before publish, consume, settle and admin operations. ``CertificateAuthenticator`` and
``AllowAll`` exist for tests and embedding only.
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
    #: read the audit trail (on the resource ``securebroker.audit``: see server/admin.py)
    AUDIT = "audit"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the certificate it connected with and the token it presented."""

    #: display name: the token subject when a token was presented, else the certificate principal
    name: str
    peer: PeerIdentity
    #: token ``sub`` (None without a token)
    subject: str | None = None
    #: roles and groups from the token (the configured claims, merged)
    roles: frozenset[str] = field(default_factory=frozenset)
    #: tenant from the token (the configured claim), if any
    tenant: str | None = None
    issuer: str | None = None
    token_expires_at: datetime | None = None
    #: the token's ``cnf.x5t#S256`` when it is certificate-bound
    bound_thumbprint: str | None = None

    @property
    def certificate(self) -> str:
        """The transport identity: the client certificate's principal (URI SAN or CN)."""
        return self.peer.principal


class Authenticator(Protocol):
    async def authenticate(self, peer: PeerIdentity, token: str | None) -> Principal:
        """Return the principal or raise ``AuthenticationError`` (opaque to the peer)."""
        ...


class Authorizer(Protocol):
    @property
    def generation(self) -> int:
        """Changes whenever decisions may change (a policy reload), so callers' caches notice."""
        ...

    def authorize(
        self, principal: Principal, action: Action, topic: str, subscription: str | None = None
    ) -> None:
        """Return if allowed; raise ``AuthorizationError`` (reason in ``detail``) otherwise."""
        ...


class CertificateAuthenticator:
    async def authenticate(self, peer: PeerIdentity, token: str | None) -> Principal:
        return Principal(name=peer.principal, peer=peer)


class AllowAll:
    """Development and tests only: every authenticated caller may do everything. Not reachable
    from configuration; ``securebroker serve`` always enforces a policy."""

    generation = 0

    def authorize(
        self, principal: Principal, action: Action, topic: str, subscription: str | None = None
    ) -> None:
        return None
