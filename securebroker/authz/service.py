"""The one place authorization decisions are made, and the wiring of authentication from config.

Every front door asks ``PolicyAuthorizer.authorize``; connections cache its answers per
(action, topic, subscription) and drop the cache when ``generation`` changes (a policy reload),
so the hot path pays a dict lookup per message, not a policy evaluation or a signature check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from securebroker.authz.policy import PolicyError, PolicyStore
from securebroker.authz.tokens import JwtAuthenticator, KeySource, TokenVerifier, VerifierSettings
from securebroker.config import AuthConfig
from securebroker.errors import AuthorizationError, ConfigError
from securebroker.server.auth import Action, Principal

log = logging.getLogger(__name__)


class PolicyAuthorizer:
    """Deny by default; an explicit deny wins (``securebroker.authz.policy``)."""

    def __init__(self, policies: PolicyStore) -> None:
        self.policies = policies

    @property
    def generation(self) -> int:
        return self.policies.generation

    def authorize(
        self, principal: Principal, action: Action, topic: str, subscription: str | None = None
    ) -> None:
        decision = self.policies.policy.decide(principal, action, topic, subscription)
        if not decision.allowed:
            raise AuthorizationError(
                f"{action} on topic {topic!r} is not permitted",
                detail=f"{principal.name}: {decision.reason}",
            )


@dataclass
class Auth:
    authenticator: JwtAuthenticator
    authorizer: PolicyAuthorizer
    policies: PolicyStore
    #: seconds past ``exp`` a connection may live (the verifier's leeway)
    token_grace: float
    #: told of every reload that changed the policy or failed: ``(ok, digest or error)``
    on_reload: Callable[[bool, str], None] = field(default=lambda ok, info: None)

    def reload_policies(self) -> bool:
        """Reload the policy files; a bad file is logged and the old policy stays in force."""
        try:
            changed = self.policies.reload()
        except PolicyError as exc:
            error = str(exc)
        else:
            error = ""
        if error:
            log.error("policy not reloaded, the previous policy stays in force: %s", error)
            self.on_reload(False, error)
            return False
        if changed:
            p = self.policies.policy
            self.on_reload(True, p.digest)
            log.info(
                "policy reloaded: %d rule(s), digest %s, generation %d",
                p.rule_count,
                p.digest[:16],
                self.policies.generation,
            )
        return changed


def build_auth(cfg: AuthConfig) -> Auth:
    cfg.validate()
    verifier: TokenVerifier | None = None
    if cfg.jwks_file or cfg.jwks_url:
        settings = VerifierSettings(
            issuer=cfg.issuer,
            audience=cfg.audience,
            algorithms=frozenset(cfg.algorithms),
            leeway=timedelta(seconds=cfg.leeway_seconds),
            max_lifetime=timedelta(seconds=cfg.max_token_lifetime_seconds),
            require_bound=cfg.require_bound_token,
            roles_claims=tuple(cfg.roles_claims),
            tenant_claim=cfg.tenant_claim,
        )
        keys = KeySource(
            settings.algorithms,
            file=Path(cfg.jwks_file) if cfg.jwks_file else None,
            url=cfg.jwks_url or None,
            refetch_interval=cfg.jwks_refetch_seconds,
        )
        verifier = TokenVerifier(settings, keys)
    try:
        policies = PolicyStore(Path(cfg.policy))
    except PolicyError as exc:
        raise ConfigError(f"auth.policy: {exc}") from None
    return Auth(
        authenticator=JwtAuthenticator(verifier, require_token=cfg.require_token),
        authorizer=PolicyAuthorizer(policies),
        policies=policies,
        token_grace=cfg.leeway_seconds,
    )
