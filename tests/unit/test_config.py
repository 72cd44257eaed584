"""Configuration loading (securebroker/config.py): TOML file, environment overrides, errors.

Every error must be a ``ConfigError`` with one line that names the offending key, and must
never carry the DSN, which may hold the database password.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from securebroker.config import Config, load
from securebroker.errors import ConfigError

PASSWORD = "s3cr3t-Pa55"
DSN = f"postgresql://broker:{PASSWORD}@db.internal:5432/securebroker?sslmode=verify-full"

VALID = f"""
[database]
dsn = "{DSN}"
pool_min = 4
pool_max = 32

[broker]
idempotency_retention_days = 3
default_max_attempts = 7
default_lease_seconds = 45.5
backoff_base_ms = 200
backoff_max_ms = 60000

[listener]
host = "0.0.0.0"
port = 7443
min_tls = "1.2"

[logging]
level = "debug"
json = true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, environ or {})
    message = str(info.value)
    assert message, "empty error message"
    assert "\n" not in message, f"not one line: {message!r}"
    assert PASSWORD not in message and DSN not in message, f"secret echoed: {message!r}"
    return message


def test_valid_file(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, VALID), {})
    assert cfg.database.dsn == DSN
    assert (cfg.database.pool_min, cfg.database.pool_max) == (4, 32)
    assert cfg.broker.default_max_attempts == 7
    assert (cfg.listener.host, cfg.listener.port, cfg.listener.min_tls) == ("0.0.0.0", 7443, "1.2")
    assert (cfg.logging.level, cfg.logging.json) == ("debug", True)
    assert cfg.listener.max_connections == 1000  # defaults fill what the file leaves out

    core = cfg.core_settings()
    assert core.idempotency_retention == timedelta(days=3)
    sub = core.default_subscription
    assert (sub.max_attempts, sub.lease) == (7, timedelta(seconds=45.5))
    assert (sub.backoff_base, sub.backoff_max) == (
        timedelta(milliseconds=200),
        timedelta(milliseconds=60_000),
    )


def test_defaults_with_only_a_dsn(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, f'[database]\ndsn = "{DSN}"\n'), {})
    assert cfg.broker == Config().broker
    assert cfg.core_settings().idempotency_retention == timedelta(days=7)


def test_environment_overrides_file(tmp_path: Path) -> None:
    other = "postgres://other@db2/securebroker"
    cfg = load(
        write(tmp_path, VALID),
        {
            "SECUREBROKER_DATABASE__DSN": other,
            "SECUREBROKER_BROKER__DEFAULT_MAX_ATTEMPTS": "5",
            "SECUREBROKER_BROKER__DEFAULT_LEASE_SECONDS": "2.5",
            "SECUREBROKER_LOGGING__JSON": "false",
            "SECUREBROKER_LISTENER__PORT": "0",
            "UNRELATED": "ignored",
            "SECUREBROKER_NO_SECTION": "ignored: not SECTION__KEY",
        },
    )
    assert cfg.database.dsn == other
    assert cfg.database.pool_max == 32  # untouched keys of an overridden section stay
    assert cfg.broker.default_max_attempts == 5
    assert isinstance(cfg.broker.default_max_attempts, int)
    assert cfg.broker.default_lease_seconds == 2.5
    assert cfg.logging.json is False
    assert cfg.listener.port == 0


def test_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECUREBROKER_DATABASE__DSN", DSN)
    monkeypatch.setenv("SECUREBROKER_DATABASE__POOL_MAX", "8")
    cfg = load(None)  # reads os.environ when no mapping is given
    assert (cfg.database.dsn, cfg.database.pool_max) == (DSN, 8)


FILE_ERRORS = [
    pytest.param(f'[database]\ndsn = "{DSN}"\nurl = "{DSN}"\n', "database.url", id="unknown-key"),
    pytest.param(f'[database]\ndsn = "{DSN}"\n[cache]\nsize = 1\n', "cache", id="unknown-section"),
    pytest.param(
        f'[database]\ndsn = "{DSN}"\npool_max = "many"\n', "database.pool_max", id="wrong-type"
    ),
    pytest.param(f"[database]\ndsn = {{ url = '{DSN}' }}\n", "database.dsn", id="dsn-not-string"),
    pytest.param(f'database = "{DSN}"\n', "database", id="section-not-table"),
    pytest.param(
        f'[database]\ndsn = "{DSN}"\npool_min = 0\n', "database.pool_min", id="below-range"
    ),
    pytest.param(
        f'[database]\ndsn = "{DSN}"\n[listener]\nport = 70000\n', "listener.port", id="above-range"
    ),
    pytest.param(
        f'[database]\ndsn = "{DSN}"\n[broker]\ndefault_lease_seconds = 0.5\n',
        "broker.default_lease_seconds",
        id="float-range",
    ),
    pytest.param("[database]\npool_min = 1\n", "database.dsn", id="missing-dsn"),
    pytest.param('[database]\ndsn = ""\n', "database.dsn", id="empty-dsn"),
    pytest.param(
        f'[database]\ndsn = "{DSN.replace("postgresql", "mysql")}"\n',
        "database.dsn",
        id="non-postgres-dsn",
    ),
    pytest.param(
        f'[database]\ndsn = "{DSN}"\npool_min = 20\npool_max = 10\n',
        "database.pool_min",
        id="pool-min-above-max",
    ),
    pytest.param(
        f'[database]\ndsn = "{DSN}"\n[broker]\nbackoff_base_ms = 9000\nbackoff_max_ms = 10\n',
        "broker.backoff_base_ms",
        id="backoff-base-above-max",
    ),
]


@pytest.mark.parametrize(("text", "key"), FILE_ERRORS)
def test_file_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    message = load_error(write(tmp_path, text))
    assert message.startswith(f"{key}:"), message


ENV_ERRORS = [
    pytest.param({"SECUREBROKER_DATABASE__POOLMAX": "3"}, "database.poolmax", id="unknown-key"),
    pytest.param({"SECUREBROKER_DATABASE__POOL_MIN": "abc"}, "database.pool_min", id="not-int"),
    pytest.param({"SECUREBROKER_DATABASE__POOL_MIN": "1.5"}, "database.pool_min", id="not-int2"),
    pytest.param(
        {"SECUREBROKER_BROKER__DEFAULT_MAX_ATTEMPTS": "1001"},
        "broker.default_max_attempts",
        id="out-of-range",
    ),
    pytest.param(
        {"SECUREBROKER_DATABASE__DSN": DSN.replace("postgresql", "http")},
        "database.dsn",
        id="non-postgres-dsn",
    ),
    pytest.param({"SECUREBROKER_DATABASE__DSN": ""}, "database.dsn", id="empty-dsn"),
    pytest.param(
        {"SECUREBROKER_DATABASE__POOL_MIN": "50", "SECUREBROKER_DATABASE__POOL_MAX": "5"},
        "database.pool_min",
        id="pool-min-above-max",
    ),
]


@pytest.mark.parametrize(("environ", "key"), ENV_ERRORS)
def test_environment_errors_name_the_key(tmp_path: Path, environ: dict[str, str], key: str) -> None:
    message = load_error(write(tmp_path, f'[database]\ndsn = "{DSN}"\n'), environ)
    assert message.startswith(f"{key}:"), message


def test_environment_into_a_non_table_section(tmp_path: Path) -> None:
    path = write(tmp_path, f'database = "{DSN}"\n')
    message = load_error(path, {"SECUREBROKER_DATABASE__POOL_MIN": "2"})
    assert message.startswith("database:"), message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f'[database]\ndsn = "{DSN}\n', id="unterminated-string"),
        pytest.param(f"[database]\ndsn = {DSN}\n", id="bare-value"),
        pytest.param(f'[database]\ndsn = "{DSN}"\ndsn = "{DSN}"\n', id="duplicate-key"),
        pytest.param(f'[database\ndsn = "{DSN}"\n', id="broken-header"),
    ],
)
def test_bad_toml_names_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = load_error(path)
    assert str(path) in message and "TOML" in message, message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    message = load_error(path, {"SECUREBROKER_DATABASE__DSN": DSN})
    assert str(path) in message and "not found" in message, message


@pytest.mark.parametrize(
    ("key", "toml_value"),
    [
        ("database.pool_max", f'"{PASSWORD}"'),
        ("listener.host", "[1, 2]"),
        ("logging.level", f'"{PASSWORD}"'),
        ("listener.min_tls", f'"{PASSWORD}"'),
    ],
)
def test_rejected_values_are_never_echoed(tmp_path: Path, key: str, toml_value: str) -> None:
    """The module promises values are never echoed: a secret pasted into the wrong setting
    must not end up in logs through the error that rejects it."""
    section, name = key.split(".")
    extra = f"{name} = {toml_value}\n" if section == "database" else ""
    other = f"[{section}]\n{name} = {toml_value}\n" if section != "database" else ""
    path = write(tmp_path, f'[database]\ndsn = "{DSN}"\n{extra}{other}')
    message = load_error(path)  # also asserts that PASSWORD is absent
    assert message.startswith(f"{key}:"), message
