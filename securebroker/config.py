"""Configuration: one TOML file plus environment overrides, validated once at start.

Environment variables ``SECUREBROKER_<SECTION>__<KEY>`` override the file, e.g.
``SECUREBROKER_DATABASE__DSN`` or ``SECUREBROKER_BROKER__DEFAULT_MAX_ATTEMPTS=5``. Any error is
reported as one line naming the offending key (``ConfigError``); values are never echoed,
since a DSN may hold a password.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from securebroker.core.broker import CoreSettings
from securebroker.core.model import SubscriptionSettings
from securebroker.errors import ConfigError

ENV_PREFIX = "SECUREBROKER_"

Positive = Annotated[int, msgspec.Meta(ge=1)]


class DatabaseConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dsn: str = ""
    pool_min: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    pool_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 16


class BrokerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    idempotency_retention_days: Annotated[float, msgspec.Meta(gt=0, le=3650)] = 7.0
    default_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    default_lease_seconds: Annotated[float, msgspec.Meta(ge=1, le=43200)] = 30.0
    backoff_base_ms: Positive = 1000
    backoff_max_ms: Positive = 300_000
    sweep_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=3_600_000)] = 1000
    cleanup_interval_ms: Annotated[int, msgspec.Meta(ge=100, le=3_600_000)] = 5000
    #: share transactions between concurrent publishes and acks (docs/adr/0005-group-commit.md)
    group_commit: bool = True
    group_committers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 3
    #: file holding the secret that keys idempotency fingerprints (32 random bytes, hex)
    fingerprint_key_file: str = ""


class ListenerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 7878
    cert: str = ""
    key: str = ""
    ca: str = ""
    crl: str = ""
    min_tls: Literal["1.2", "1.3"] = "1.3"
    handshake_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=120_000)] = 10_000
    idle_timeout_ms: Annotated[int, msgspec.Meta(ge=1000, le=86_400_000)] = 300_000
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    max_connections_per_identity: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100


class LoggingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json: bool = False


class EncryptionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Envelope encryption at rest (docs/security.md, ADR 0007)."""

    #: "file" (a local keyring file), "pkcs11" (an HSM), or "none" (plaintext at rest:
    #: benchmarks and tests only; the broker warns loudly at start)
    keyring: Literal["file", "pkcs11", "none"] = "file"
    keyring_file: str = ""
    pkcs11_module: str = ""
    pkcs11_token: str = ""
    #: file holding the token user PIN (mode 0600), never the PIN itself in config
    pkcs11_pin_file: str = ""
    pkcs11_label_prefix: str = "securebroker-kek"
    #: scope DEKs by this message attribute when present (tenant, data subject), else by topic
    scope_attribute: str = ""
    dek_max_messages: Annotated[int, msgspec.Meta(ge=1, le=1 << 32)] = 1 << 24
    dek_max_age_hours: Annotated[float, msgspec.Meta(gt=0, le=24 * 365)] = 24.0
    dek_cache_size: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000
    dek_cache_seconds: Annotated[float, msgspec.Meta(ge=1, le=86_400)] = 300.0


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Authentication (JWT bearer tokens) and authorization (policies). See docs/security.md."""

    #: a policy file or a directory of ``*.toml`` policies; required: there is no allow-all mode
    policy: str = ""
    #: seconds between checks of the policy files for changes (SIGHUP reloads at once)
    policy_poll_seconds: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 2.0
    #: refuse connections that present no token (certificate-only principals when false)
    require_token: bool = True
    jwks_file: str = ""
    jwks_url: str = ""
    #: refresh the JWKS URL this often; an unknown ``kid`` refetches at most every refetch seconds
    jwks_refresh_seconds: Annotated[float, msgspec.Meta(ge=10, le=86400)] = 300.0
    jwks_refetch_seconds: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0
    issuer: str = ""
    audience: str = ""
    #: allow-list of asymmetric JWS algorithms; the token header never chooses
    algorithms: list[str] = msgspec.field(
        default_factory=lambda: ["EdDSA", "ES256", "ES384", "PS256", "RS256"]
    )
    leeway_seconds: Annotated[float, msgspec.Meta(ge=0, le=300)] = 30.0
    max_token_lifetime_seconds: Annotated[float, msgspec.Meta(ge=60, le=31_536_000)] = 86400.0
    #: RFC 8705: refuse tokens that are not bound to the client certificate (``cnf.x5t#S256``)
    require_bound_token: bool = False
    roles_claims: list[str] = msgspec.field(default_factory=lambda: ["roles", "groups"])
    tenant_claim: str = "tenant"

    def validate(self) -> None:
        """Checked when the broker builds its authentication (``serve``), not by ``load``: tools
        that never authenticate anyone (``migrate``) need no ``[auth]`` section."""
        if not self.policy:
            raise ConfigError(
                "auth.policy: required (a policy file or directory; access is denied by default)"
            )
        has_keys = bool(self.jwks_file or self.jwks_url)
        if self.require_token and not has_keys:
            raise ConfigError("auth.jwks_file: required when auth.require_token is true")
        if has_keys and not self.issuer:
            raise ConfigError("auth.issuer: required to verify tokens")
        if has_keys and not self.audience:
            raise ConfigError("auth.audience: required to verify tokens")
        if self.require_bound_token and not has_keys:
            raise ConfigError("auth.require_bound_token: needs auth.jwks_file or auth.jwks_url")


class TelemetryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """OpenTelemetry tracing of the broker's own work (docs/operations.md "Tracing", ADR 0009)."""

    #: broker-side spans (publish, deliver, settle); off by default, and then nothing is paid
    traces: bool = False
    #: base URL of an OTLP/HTTP collector ("http://collector:4318"; "/v1/traces" is appended);
    #: unset: the exporter's own default and ``OTEL_EXPORTER_OTLP_*`` environment variables
    otlp_endpoint: str | None = None
    service_name: str = "securebroker"
    #: fraction of new traces kept (spans whose producer's trace was sampled follow it)
    sample_ratio: float = 1.0

    def validate(self) -> None:
        if not self.service_name.strip():
            raise ConfigError("telemetry.service_name: must not be empty")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError("telemetry.sample_ratio: must be between 0 and 1")
        if self.otlp_endpoint is not None:
            from urllib.parse import urlsplit  # noqa: PLC0415

            url = urlsplit(self.otlp_endpoint)
            try:
                url.port  # noqa: B018 (raises on a malformed port)
            except ValueError:
                url = url._replace(netloc="")
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(
                    "telemetry.otlp_endpoint: must be an http:// or https:// URL with a host"
                )


class AuditConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The tamper-evident audit trail (docs/security.md, ADR 0008)."""

    #: off only for benchmarks and tests: ``serve`` warns loudly
    enabled: bool = True
    #: Ed25519 private key (PEM) that signs checkpoints; keep it outside the database host's
    #: reach of database administrators (``securebroker audit keygen`` creates one)
    signing_key: str = ""
    checkpoint_interval_seconds: Annotated[float, msgspec.Meta(ge=1, le=86_400)] = 60.0

    def validate(self) -> None:
        if self.enabled and not self.signing_key:
            raise ConfigError(
                "audit.signing_key: required when audit.enabled is true (an Ed25519 key file; "
                "`securebroker audit keygen PATH` creates one)"
            )


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    listener: ListenerConfig = msgspec.field(default_factory=ListenerConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    encryption: EncryptionConfig = msgspec.field(default_factory=EncryptionConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)

    def core_settings(self) -> CoreSettings:
        b = self.broker
        return CoreSettings(
            idempotency_retention=timedelta(days=b.idempotency_retention_days),
            default_subscription=SubscriptionSettings(
                max_attempts=b.default_max_attempts,
                lease=timedelta(seconds=b.default_lease_seconds),
                backoff_base=timedelta(milliseconds=b.backoff_base_ms),
                backoff_max=timedelta(milliseconds=b.backoff_max_ms),
            ),
        )

    def validate(self) -> Config:
        if not self.database.dsn:
            raise ConfigError("database.dsn: required (a postgresql:// URI)")
        if not self.database.dsn.startswith(("postgresql://", "postgres://")):
            raise ConfigError("database.dsn: must be a postgresql:// URI")
        if self.database.pool_min > self.database.pool_max:
            raise ConfigError("database.pool_min: must not exceed database.pool_max")
        if self.broker.backoff_base_ms > self.broker.backoff_max_ms:
            raise ConfigError("broker.backoff_base_ms: must not exceed broker.backoff_max_ms")
        self.telemetry.validate()
        return self


_PATH = re.compile(r"`\$\.([^`]+)`")


def _key_of(message: str) -> str:
    m = _PATH.search(message)
    return m.group(1) if m else "(top level)"


def _explain(exc: msgspec.ValidationError) -> ConfigError:
    text = str(exc)
    key = _key_of(text)
    # msgspec quotes rejected values of enum-like settings; a value may be a secret: drop it.
    reason = re.sub(r"\s*'[^']*'", "", text.split(" - at ", maxsplit=1)[0])
    if reason.startswith("Object contains unknown field"):
        field = reason.split("`")[1] if "`" in reason else "?"
        key = f"{key}.{field}" if key != "(top level)" else field
        return ConfigError(f"{key}: unknown setting")
    return ConfigError(f"{key}: {reason}")


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section and key:
            out.setdefault(section, {})[key] = value
    return out


def load(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (may be None), apply environment overrides, validate; or ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for section, values in env_overrides(os.environ if environ is None else environ).items():
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: must be a table")
        target.update(values)
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(exc) from None
    return cfg.validate()


def dump(cfg: Config) -> str:
    """TOML text for ``cfg`` (sections of scalars and string lists), as ``load`` reads it back.

    ``securebroker dev`` writes its configuration with it, so operator commands that take
    ``--config`` (``keys``, ``migrate``, ``serve``) work against the development broker too.
    """
    import json  # noqa: PLC0415

    lines: list[str] = []
    for section, values in msgspec.to_builtins(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:  # unset optional settings: TOML has no null
                continue
            # JSON strings, numbers, booleans and string arrays are valid TOML values
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)
