"""Declarative policies: decisions, loading and validation errors, reloading, explanations."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from securebroker.authz import (
    Decision,
    Effect,
    Policy,
    PolicyError,
    PolicyStore,
    load_policy,
)
from securebroker.errors import ConfigError
from securebroker.server.auth import Action, Principal
from securebroker.tls import PeerIdentity

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "policies" / "examples" / "payments.toml"
SPIFFE = "spiffe://securebroker.dev/"

PUBLISH, CONSUME, ADMIN = Action.PUBLISH, Action.CONSUME, Action.ADMIN


def who(
    cert: str = "dev-client",
    *,
    subject: str | None = None,
    roles: tuple[str, ...] = (),
    tenant: str | None = None,
) -> Principal:
    """A principal with certificate ``spiffe://securebroker.dev/<cert>`` (or a bare CN)."""
    principal = cert if ":" in cert or cert.startswith("CN") else SPIFFE + cert
    peer = PeerIdentity(
        subject=f"CN={cert}",
        common_name=cert,
        sans=(f"uri:{principal}",),
        principal=principal,
        thumbprint_s256="dGh1bWJwcmludA",
        not_after=datetime(2035, 1, 1, tzinfo=UTC),
    )
    return Principal(
        name=subject or principal,
        peer=peer,
        subject=subject,
        roles=frozenset(roles),
        tenant=tenant,
    )


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


RULES = """
version = 1

[[rules]]
id = "orders-writer"
description = "the orders service publishes orders"
actions = ["publish"]
topics = ["orders.#"]
subjects = ["svc-orders"]

[[rules]]
id = "role-readers"
actions = ["consume"]
topics = ["orders.*"]
subscriptions = ["billing.*"]
roles = ["reader", "auditor"]

[[rules]]
id = "acme-analysts"
actions = ["consume", "publish"]
topics = ["analytics.#"]
roles = ["analyst"]
tenants = ["acme"]

[[rules]]
id = "cert-admin"
actions = ["admin"]
topics = ["#"]
certificates = ["spiffe://securebroker.dev/dev-admin", "CN=legacy-admin"]

[[rules]]
id = "bound-payments"
actions = ["publish"]
topics = ["payments.*"]
subjects = ["svc-pay"]
certificates = ["spiffe://securebroker.dev/pay"]

[[rules]]
id = "public-read"
actions = ["consume"]
topics = ["public.#"]
any_principal = true

[[rules]]
id = "no-secrets"
effect = "deny"
actions = ["publish", "consume"]
topics = ["#.secret.#"]
any_principal = true

[[rules]]
id = "blocked-tenant"
effect = "deny"
actions = ["publish", "consume", "admin"]
topics = ["#"]
tenants = ["blocked"]

[[rules]]
id = "public-read-again"
actions = ["consume"]
topics = ["public.news"]
any_principal = true
"""

ORDERS = who(subject="svc-orders")
READER = who(subject="alice", roles=("reader",))
AUDITOR = who(subject="alice", roles=("auditor", "other"))
ANALYST_ACME = who(subject="bob", roles=("analyst",), tenant="acme")
ANALYST_GLOBEX = who(subject="carol", roles=("analyst",), tenant="globex")
ACME_NO_ROLE = who(subject="dan", roles=("viewer",), tenant="acme")
ADMIN_CERT = who("dev-admin")
ADMIN_CERT_WITH_TOKEN = who("dev-admin", subject="erin")
LEGACY_ADMIN = who("CN=legacy-admin")
PAY_BOUND = who("pay", subject="svc-pay")
PAY_WRONG_CERT = who("dev-client", subject="svc-pay")
PAY_CERT_NO_TOKEN = who("pay")
# certificate-only principals never match subjects/roles/tenants, whatever else they carry
CERT_NAMED_LIKE_SUBJECT = who("svc-orders")
CERT_ONLY_WITH_ROLES = who(roles=("reader",), tenant="acme")
BLOCKED = who(subject="mallory", roles=("reader",), tenant="blocked")
NOBODY = who()

DECISIONS: list[tuple[str, Principal, Action, str, str | None, bool, str | None]] = [
    # subjects
    ("subject allowed", ORDERS, PUBLISH, "orders", None, True, "orders-writer"),
    ("subject, deep topic", ORDERS, PUBLISH, "orders.eu.x", None, True, "orders-writer"),
    ("subject, other topic", ORDERS, PUBLISH, "payments.eu", None, False, None),
    ("subject, action not granted", ORDERS, CONSUME, "orders.eu", None, False, None),
    (
        "cert-only never matches subjects",
        CERT_NAMED_LIKE_SUBJECT,
        PUBLISH,
        "orders",
        None,
        False,
        None,
    ),
    # roles (OR within the field) and the subscription restriction
    ("role", READER, CONSUME, "orders.eu", "billing.eu", True, "role-readers"),
    ("other listed role", AUDITOR, CONSUME, "orders.eu", "billing.x", True, "role-readers"),
    ("role, subscription not listed", READER, CONSUME, "orders.eu", "shipping.eu", False, None),
    ("role, subscription too deep", READER, CONSUME, "orders.eu", "billing.eu.x", False, None),
    ("role, no subscription given", READER, CONSUME, "orders.eu", None, True, "role-readers"),
    ("role, '*' is one segment", READER, CONSUME, "orders.eu.x", "billing.eu", False, None),
    ("role, no role", ORDERS, CONSUME, "orders.eu", "billing.eu", False, None),
    (
        "cert-only never matches roles",
        CERT_ONLY_WITH_ROLES,
        CONSUME,
        "orders.eu",
        None,
        False,
        None,
    ),
    # roles AND tenants
    ("role and tenant", ANALYST_ACME, CONSUME, "analytics", None, True, "acme-analysts"),
    (
        "role and tenant, publish",
        ANALYST_ACME,
        PUBLISH,
        "analytics.q1",
        None,
        True,
        "acme-analysts",
    ),
    ("role, wrong tenant", ANALYST_GLOBEX, CONSUME, "analytics", None, False, None),
    ("tenant, wrong role", ACME_NO_ROLE, CONSUME, "analytics", None, False, None),
    (
        "cert-only never matches tenants",
        CERT_ONLY_WITH_ROLES,
        CONSUME,
        "analytics",
        None,
        False,
        None,
    ),
    # certificates (no token needed, and a token does not hurt)
    ("certificate", ADMIN_CERT, ADMIN, "anything.at.all", None, True, "cert-admin"),
    ("certificate with token", ADMIN_CERT_WITH_TOKEN, ADMIN, "x", None, True, "cert-admin"),
    ("certificate CN", LEGACY_ADMIN, ADMIN, "x", None, True, "cert-admin"),
    ("certificate not listed", NOBODY, ADMIN, "x", None, False, None),
    ("admin cert cannot publish", ADMIN_CERT, PUBLISH, "orders", None, False, None),
    # subjects AND certificates (a token bound to its service's certificate)
    ("subject and certificate", PAY_BOUND, PUBLISH, "payments.eu", None, True, "bound-payments"),
    ("subject, wrong certificate", PAY_WRONG_CERT, PUBLISH, "payments.eu", None, False, None),
    ("certificate, no token", PAY_CERT_NO_TOKEN, PUBLISH, "payments.eu", None, False, None),
    # any principal
    ("any principal", NOBODY, CONSUME, "public", None, True, "public-read"),
    (
        "any principal, first allow reported",
        NOBODY,
        CONSUME,
        "public.news",
        None,
        True,
        "public-read",
    ),
    ("any principal, not publish", NOBODY, PUBLISH, "public.news", None, False, None),
    # explicit deny wins over every allow
    ("deny wins over subject", ORDERS, PUBLISH, "orders.secret", None, False, "no-secrets"),
    ("deny wins over any", NOBODY, CONSUME, "public.secret.x", None, False, "no-secrets"),
    ("deny does not cover admin", ADMIN_CERT, ADMIN, "orders.secret", None, True, "cert-admin"),
    ("tenant deny", BLOCKED, CONSUME, "orders.eu", "billing.eu", False, "blocked-tenant"),
    ("tenant deny, public", BLOCKED, CONSUME, "public", None, False, "blocked-tenant"),
    ("first deny reported", BLOCKED, CONSUME, "public.secret", None, False, "no-secrets"),
    # default deny
    ("default deny", NOBODY, PUBLISH, "orders.eu", None, False, None),
    ("literal topics are case-sensitive", ORDERS, PUBLISH, "Orders", None, False, None),
]


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return load_policy(write(tmp_path, "rules.toml", RULES))


@pytest.mark.parametrize(
    ("principal", "action", "topic", "subscription", "allowed", "rule_id"),
    [case[1:] for case in DECISIONS],
    ids=[case[0] for case in DECISIONS],
)
def test_decisions(
    policy: Policy,
    principal: Principal,
    action: Action,
    topic: str,
    subscription: str | None,
    allowed: bool,
    rule_id: str | None,
) -> None:
    decision = policy.decide(principal, action, topic, subscription)
    assert decision.allowed is allowed
    assert decision.rule_id == rule_id
    # explain agrees with decide
    applying = [
        m.rule_id for m in policy.explain(principal, action, topic, subscription) if m.matched
    ]
    if rule_id is not None:
        assert rule_id in applying
    else:
        assert applying == []


def test_decision_reasons(policy: Policy) -> None:
    assert policy.decide(ORDERS, PUBLISH, "orders") == Decision(
        True, "orders-writer", "allowed by rule 'orders-writer'"
    )
    assert policy.decide(ORDERS, PUBLISH, "x.secret") == Decision(
        False, "no-secrets", "denied by rule 'no-secrets'"
    )
    assert policy.decide(ORDERS, PUBLISH, "orders.eu").allowed
    assert policy.decide(NOBODY, PUBLISH, "orders.eu") == Decision(
        False, None, "no rule grants publish on topic 'orders.eu'"
    )
    assert policy.decide(READER, CONSUME, "orders.eu", "shipping").reason == (
        "no rule grants consume on topic 'orders.eu' with subscription 'shipping'"
    )


def test_rules_are_indexed_in_file_order(policy: Policy) -> None:
    assert policy.rule_count == 9
    assert [r.id for r in policy.rules][:2] == ["orders-writer", "role-readers"]
    rule = policy.rules[0]
    assert rule.effect is Effect.ALLOW
    assert rule.description == "the orders service publishes orders"
    assert rule.actions == frozenset({PUBLISH})
    assert rule.index == 0
    assert policy.rules[6].effect is Effect.DENY


def test_empty_policy_denies_everything(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    policy = load_policy(empty)
    assert policy.rule_count == 0
    assert policy.files == ()
    assert policy.digest == hashlib.sha256(b"").hexdigest()
    assert not policy.decide(ADMIN_CERT, ADMIN, "x").allowed
    no_rules = load_policy(write(tmp_path, "none.toml", "version = 1\n"))
    assert no_rules.rule_count == 0
    assert not no_rules.decide(NOBODY, CONSUME, "public").allowed


# --------------------------------------------------------------------------------------------
# loading


def test_example_policy_loads_and_decides() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.rule_count == 6
    assert policy.source == (EXAMPLE,)
    assert policy.files == (EXAMPLE,)
    assert policy.digest == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    api = who("payments-api", subject="svc-payments-api")
    assert policy.decide(api, PUBLISH, "payments.eu.captured").allowed
    assert not policy.decide(api, PUBLISH, "payments.card-data.raw").allowed
    assert not policy.decide(who(subject="svc-payments-api"), PUBLISH, "payments").allowed
    refunds = who(subject="svc-refunds", roles=("refunds-writer",))
    assert policy.decide(refunds, PUBLISH, "eu.refunds").allowed
    assert not policy.decide(refunds, PUBLISH, "refunds").allowed
    ledger = who(subject="svc-ledger", roles=("ledger",))
    assert policy.decide(ledger, CONSUME, "eu.refunds", "ledger.refunds").allowed
    assert not policy.decide(ledger, CONSUME, "eu.refunds", "mine").allowed
    analyst = who(subject="ann", roles=("data-science",), tenant="acme")
    assert policy.decide(analyst, CONSUME, "payments.eu.captured").allowed
    assert not policy.decide(analyst, CONSUME, "payments.us.captured").allowed
    assert policy.decide(who("dev-admin"), ADMIN, "payments.eu").allowed
    assert not policy.decide(who("dev-client"), ADMIN, "payments.eu").allowed


def test_load_directory_sorted_non_recursive(tmp_path: Path) -> None:
    b = write(tmp_path, "b.toml", RULES)
    a = write(
        tmp_path,
        "a.toml",
        'version = 1\n[[rules]]\nid = "first"\nactions = ["publish"]\ntopics = ["#"]\n'
        'subjects = ["svc-orders"]\n',
    )
    write(tmp_path, "notes.txt", "not a policy")
    write(tmp_path, ".#a.toml", "editor lock file, not a policy")
    (tmp_path / "nested").mkdir()
    write(tmp_path / "nested", "c.toml", "not even toml [")
    policy = load_policy(tmp_path)
    assert policy.files == (a, b)
    assert policy.source == (tmp_path,)
    assert policy.rule_count == 10
    assert policy.rules[0].id == "first" and policy.rules[0].source == a
    assert policy.digest == hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()
    # the earlier file's allow is reported first
    assert policy.decide(ORDERS, PUBLISH, "orders").rule_id == "first"
    # a list of paths, with the same file twice, loads each file once, in the order given
    again = load_policy([b, tmp_path])
    assert again.files == (b, a)
    assert again.rules[0].id == "orders-writer"
    assert load_policy(str(b)).files == (b,)  # type: ignore[arg-type]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "nope.toml")


def rule(body: str, rule_id: str = "r1") -> str:
    return f'version = 1\n\n[[rules]]\nid = "{rule_id}"\n{body}\n'


OK = 'actions = ["publish"]\ntopics = ["orders.#"]\nany_principal = true\n'

INVALID: list[tuple[str, str, list[str]]] = [
    ("invalid toml", "version = 1\n[[rules]\n", ["invalid TOML"]),
    ("invalid utf-8", "\udcff", ["not valid UTF-8"]),
    ("missing version", "", ["missing required field `version`"]),
    ("version 2", "version = 2\n", ["field 'version'", "unsupported policy version 2"]),
    ("version type", 'version = "1"\n', ["field 'version'", "expected `int`"]),
    ("unknown top-level field", "version = 1\nrule = []\n", ["unknown field `rule`"]),
    ("rules not a list", "version = 1\nrules = 1\n", ["field 'rules'", "expected `array`"]),
    ("unknown rule field", rule(OK + 'topic = ["x"]'), ["rule 'r1'", "unknown field `topic`"]),
    ("missing id", "version = 1\n[[rules]]\n" + OK, ["rules[0]", "missing required field `id`"]),
    ("id type", rule(OK).replace('"r1"', "7"), ["rules[0]", "field 'id'", "expected `str`"]),
    ("id chars", rule(OK, "has space"), ["rules[0]", "field 'id'", "'has space' is invalid"]),
    (
        "unusable id is reported by index",
        rule(OK + "extra = 1", "bad id"),
        ["rules[0]", "unknown field `extra`"],
    ),
    ("id too long", rule(OK, "x" * 129), ["rules[0]", "field 'id'", "is invalid"]),
    (
        "missing topics",
        rule('actions = ["publish"]\nany_principal = true'),
        ["rule 'r1'", "`topics`"],
    ),
    (
        "bad action",
        rule(OK.replace('"publish"', '"publish", "read"')),
        ["rule 'r1'", "field 'actions'", "unknown action 'read'"],
    ),
    (
        "actions not a list",
        rule(OK.replace('["publish"]', '"publish"')),
        ["rule 'r1'", "field 'actions'", "expected `array`, got `str`"],
    ),
    (
        "action not a string",
        rule(OK.replace('["publish"]', '["publish", 1]')),
        ["rule 'r1'", "field 'actions[1]'", "expected `str`, got `int`"],
    ),
    (
        "empty actions",
        rule(OK.replace('["publish"]', "[]")),
        ["rule 'r1'", "field 'actions' must not be empty"],
    ),
    (
        "empty topics",
        rule(OK.replace('["orders.#"]', "[]")),
        ["rule 'r1'", "field 'topics' must not be empty"],
    ),
    (
        "bad pattern",
        rule(OK.replace('"orders.#"', '"orders.#", "pay*"')),
        ["rule 'r1'", "field 'topics'", "pattern 'pay*' is invalid", "wildcard"],
    ),
    (
        "bad subscription pattern",
        rule(OK.replace('"publish"', '"consume"') + 'subscriptions = ["a..b"]'),
        ["rule 'r1'", "field 'subscriptions'", "pattern 'a..b' is invalid"],
    ),
    (
        "subscriptions without consume",
        rule(OK + 'subscriptions = ["billing.*"]'),
        ["rule 'r1'", "field 'subscriptions'", "include 'consume'"],
    ),
    (
        "empty subscriptions",
        rule(OK.replace('"publish"', '"consume"') + "subscriptions = []"),
        ["rule 'r1'", "field 'subscriptions' must not be empty"],
    ),
    ("bad effect", rule(OK + 'effect = "permit"'), ["rule 'r1'", "field 'effect'", "'permit'"]),
    (
        "any_principal with matchers",
        rule(OK + 'roles = ["x"]\ntenants = ["t"]'),
        ["rule 'r1'", "field 'any_principal'", "also lists roles, tenants"],
    ),
    (
        "no matchers without any_principal",
        rule('actions = ["publish"]\ntopics = ["x"]'),
        ["rule 'r1'", "field 'any_principal'", "lists no subjects, roles, tenants or certificates"],
    ),
    (
        "any_principal false without matchers",
        rule('actions = ["publish"]\ntopics = ["x"]\nany_principal = false'),
        ["rule 'r1'", "field 'any_principal'"],
    ),
    (
        "empty matcher list",
        rule('actions = ["publish"]\ntopics = ["x"]\nsubjects = []'),
        ["rule 'r1'", "field 'subjects' must not be empty"],
    ),
    (
        "empty matcher value",
        rule('actions = ["publish"]\ntopics = ["x"]\nroles = ["a", ""]'),
        ["rule 'r1'", "field 'roles' contains an empty string"],
    ),
    (
        "matcher type",
        rule('actions = ["publish"]\ntopics = ["x"]\ncertificates = "spiffe://x"'),
        ["rule 'r1'", "field 'certificates'", "expected `array`"],
    ),
    (
        "duplicate id in one file",
        rule(OK) + '\n[[rules]]\nid = "r1"\n' + OK,
        ["rule 'r1'", "field 'id'", "duplicate rule id (already defined earlier in this file)"],
    ),
    (
        "second rule reported by id",
        rule(OK) + '\n[[rules]]\nid = "r2"\n' + OK.replace("#", "##"),
        ["rule 'r2'", "field 'topics'", "'orders.##'"],
    ),
]


@pytest.mark.parametrize(
    ("text", "fragments"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_policies(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message
    assert isinstance(info.value, ConfigError)
    assert info.value.code == ConfigError.code


def test_duplicate_id_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, "10-first.toml", rule(OK, "shared"))
    second = write(
        tmp_path, "20-second.toml", rule(OK, "other") + '\n[[rules]]\nid = "shared"\n' + OK
    )
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{second}: rule 'shared': field 'id': duplicate rule id")
    assert f"already defined in {first}" in message


def test_invalid_file_in_directory_is_named(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", rule(OK))
    bad = write(tmp_path, "b.toml", "version = 3\n")
    with pytest.raises(PolicyError, match=f"^{bad}: field 'version'"):
        load_policy(tmp_path)


# --------------------------------------------------------------------------------------------
# explain


def test_explain(policy: Policy) -> None:
    matches = {m.rule_id: m for m in policy.explain(READER, CONSUME, "orders.eu", "shipping")}
    assert list(matches) == [r.id for r in policy.rules]

    writer = matches["orders-writer"]
    assert not writer.matched
    assert writer.effect is Effect.ALLOW
    assert writer.reasons == (
        "action 'consume' not listed (['publish'])",
        "subjects: 'alice' not in ['svc-orders']",
    )

    readers = matches["role-readers"]
    assert not readers.matched
    assert readers.reasons == ("subscription 'shipping' matches no pattern (['billing.*'])",)

    analysts = matches["acme-analysts"]
    assert analysts.reasons == (
        "topic 'orders.eu' matches no pattern (['analytics.#'])",
        "tenants: principal has none (want one of ['acme'])",
        "roles: none of ['reader'] in ['analyst']",
    )
    assert str(analysts).startswith("allow rule 'acme-analysts' does not apply: topic")

    blocked = matches["blocked-tenant"]
    assert blocked.effect is Effect.DENY
    assert blocked.reasons == ("tenants: principal has none (want one of ['blocked'])",)

    admin = matches["cert-admin"]
    assert admin.reasons[-1] == (
        "certificates: 'spiffe://securebroker.dev/dev-client' not in "
        "['CN=legacy-admin', 'spiffe://securebroker.dev/dev-admin']"
    )

    granted = {m.rule_id: m for m in policy.explain(READER, CONSUME, "orders.eu", "billing.eu")}
    ok = granted["role-readers"]
    assert ok.matched
    assert ok.reasons == (
        "action 'consume' listed",
        "topic 'orders.eu' matches 'orders.*'",
        "subscription 'billing.eu' matches 'billing.*'",
        "roles: ['reader'] listed",
    )
    assert str(ok).startswith("allow rule 'role-readers' applies: action")
    assert ok.source == policy.files[0]


def test_explain_certificate_only_and_any(policy: Policy) -> None:
    matches = {m.rule_id: m for m in policy.explain(ADMIN_CERT, ADMIN, "x.secret")}
    assert matches["cert-admin"].matched
    assert matches["cert-admin"].reasons[-1] == (
        "certificates: 'spiffe://securebroker.dev/dev-admin' listed"
    )
    assert matches["orders-writer"].reasons[-1] == "subjects: principal has no token"
    assert matches["blocked-tenant"].reasons == ("tenants: principal has no token",)
    no_secrets = matches["no-secrets"]
    assert no_secrets.reasons == ("action 'admin' not listed (['consume', 'publish'])",)
    public = {m.rule_id: m for m in policy.explain(NOBODY, CONSUME, "public.x", "s")}["public-read"]
    assert public.matched
    assert public.reasons[-1] == "any principal"
    roles = {m.rule_id: m for m in policy.explain(CERT_ONLY_WITH_ROLES, CONSUME, "orders.a")}
    assert roles["role-readers"].reasons == ("roles: principal has no token",)
    no_roles = {m.rule_id: m for m in policy.explain(ORDERS, CONSUME, "orders.a")}
    assert no_roles["role-readers"].reasons == (
        "roles: principal has none (want one of ['auditor', 'reader'])",
    )
    assert (
        "subscriptions: no subscription given"
        in {m.rule_id: m for m in policy.explain(AUDITOR, CONSUME, "orders.a")}[
            "role-readers"
        ].reasons
    )


# --------------------------------------------------------------------------------------------
# PolicyStore


def test_store_reload_keeps_old_policy_on_error_and_bumps_generation(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", RULES)
    store = PolicyStore(path)
    assert store.generation == 1
    assert store.sources == (path,)
    first = store.policy
    assert first.rule_count == 9
    assert not store.changed_on_disk()
    assert store.reload() is False  # same content
    assert store.generation == 1
    assert store.policy is first

    path.write_text(RULES + "\n[[rules]]\nid = 'broken'\n", encoding="utf-8")
    assert store.changed_on_disk()
    with pytest.raises(PolicyError, match="rule 'broken'"):
        store.reload()
    assert store.policy is first
    assert store.generation == 1
    assert store.policy.decide(ORDERS, PUBLISH, "orders").allowed
    # the bad edit is reported once, not on every poll
    assert not store.changed_on_disk()

    path.write_text(RULES.replace('"svc-orders"', '"svc-orders-v2"'), encoding="utf-8")
    assert store.changed_on_disk()
    assert store.reload() is True
    assert store.generation == 2
    assert store.policy is not first
    assert not store.policy.decide(ORDERS, PUBLISH, "orders").allowed
    assert store.policy.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not store.changed_on_disk()

    path.unlink()
    assert store.changed_on_disk()
    with pytest.raises(PolicyError, match="does not exist"):
        store.reload()
    assert store.generation == 2


def test_store_initial_load_errors_raise(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="unsupported policy version"):
        PolicyStore(write(tmp_path, "p.toml", "version = 0\n"))


def test_changed_on_disk_directory(tmp_path: Path) -> None:
    a = write(tmp_path, "a.toml", rule(OK, "a"))
    store = PolicyStore([tmp_path])
    assert store.policy.rule_count == 1
    assert not store.changed_on_disk()

    # a file that is not a policy does not count
    write(tmp_path, "README.md", "hello")
    assert not store.changed_on_disk()

    # a new policy file
    b = write(tmp_path, "b.toml", rule(OK, "b"))
    assert store.changed_on_disk()
    assert store.reload() is True
    assert store.generation == 2
    assert store.policy.rule_count == 2

    # same size, new mtime
    stat = a.stat()
    a.write_text(rule(OK, "A"), encoding="utf-8")
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert a.stat().st_size == stat.st_size
    assert store.changed_on_disk()
    assert store.reload() is True
    assert [r.id for r in store.policy.rules] == ["A", "b"]

    # atomic replace with identical size and mtime: the inode differs
    stat = b.stat()
    tmp = write(tmp_path, "b.toml.tmp", rule(OK, "B"))
    os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    tmp.replace(b)
    assert store.changed_on_disk()
    assert store.reload() is True
    assert store.generation == 4

    # touching without changing content: changed on disk, but not a new policy
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert store.changed_on_disk()
    assert store.reload() is False
    assert store.generation == 4
    assert not store.changed_on_disk()

    # a rename changes the files (and their order) even though the bytes are the same
    b.rename(tmp_path / "0.toml")
    assert store.changed_on_disk()
    assert store.reload() is True
    assert [r.id for r in store.policy.rules] == ["B", "A"]

    # removal
    a.unlink()
    assert store.changed_on_disk()
    assert store.reload() is True
    assert [r.id for r in store.policy.rules] == ["B"]
    assert store.generation == 6
