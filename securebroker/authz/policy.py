"""Declarative topic ACL policies (TOML): deny by default, and an explicit deny wins.

File format
-----------

A policy is one or more TOML files. Each file is::

    version = 1                      # required; the only supported version

    [[rules]]                        # zero or more rules
    id = "orders-service-publishes-orders"   # required; unique across all loaded files;
                                             # 1-128 of A-Z a-z 0-9 _ . : -
    description = "..."              # optional, for humans
    effect = "allow"                 # "allow" (default) or "deny"
    actions = ["publish"]            # non-empty; any of "publish", "consume", "admin"
    topics = ["orders.#"]            # non-empty list of topic patterns (see ``patterns``)
    subscriptions = ["billing.*"]    # optional; subscription-name patterns; only for rules
                                     # whose actions include "consume"
    # principal matchers: every field given must match (AND); within a field, any listed
    # value matches (OR). Values are compared exactly (no wildcards).
    subjects = ["svc-orders"]        # the token subject (``sub``)
    roles = ["orders-writer"]        # any of the principal's roles / groups
    tenants = ["acme"]               # the principal's tenant
    certificates = ["spiffe://securebroker.dev/orders"]  # client-certificate identity
    any_principal = false            # must be true for a rule without matchers (so "everyone"
                                     # is always written down); true with matchers is an error

Unknown keys are errors, as are empty lists (omit the key instead). Every error names the file,
the rule (id, or index when the id itself is unusable) and the field.

Semantics
---------

A rule *applies* to a request (principal, action, topic, subscription) when all of its
principal matchers match, the action is listed, the topic matches one of its topic patterns
and -- if the rule lists ``subscriptions``, the action is ``consume`` and a subscription name
is given -- the subscription name matches one of its subscription patterns. (A consume request
made without a subscription name is not restricted by ``subscriptions``.)

A principal without a token subject (certificate only) never matches a rule that lists
``subjects``, ``roles`` or ``tenants``; ``certificates`` compares ``Principal.certificate``.

The decision is: denied if any ``deny`` rule applies (the first one, in load order, is
reported); else allowed if any ``allow`` rule applies (the first one is reported); else
denied by default. Load order is the order of the paths given, files of a directory sorted
by name, rules in file order.

Loading
-------

``load_policy`` takes files and directories; a directory contributes its ``*.toml`` files
(sorted, not recursive, names starting with ``.`` skipped). Zero files or zero rules is a
valid policy that denies everything. ``Policy.digest`` is the SHA-256 (hex) of the loaded
files' bytes concatenated in load order, for audit logs. ``PolicyStore`` keeps the current
policy and reloads it on demand, keeping the old policy when the new one is invalid.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

from securebroker.authz.patterns import PatternError, PatternSet, PolicyError, compile_pattern
from securebroker.server.auth import Action, Principal

__all__ = [
    "POLICY_VERSION",
    "Decision",
    "Effect",
    "Policy",
    "PolicyError",
    "PolicyStore",
    "Rule",
    "RuleMatch",
    "load_policy",
]

POLICY_VERSION: Final = 1

_RULE_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_ACTIONS: Final = {action.value: action for action in Action}
_ACTION_NAMES: Final = ", ".join(repr(a.value) for a in Action)
_MATCHER_FIELDS: Final = ("subjects", "roles", "tenants", "certificates")


class Effect(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


# --------------------------------------------------------------------------------------------
# documents (what msgspec decodes; validated into Rule afterwards)


class _PolicyDoc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int
    # rules are decoded one by one so every error can name the rule
    rules: list[dict[str, Any]] = msgspec.field(default_factory=list)


# Optional fields are UNSET rather than None: TOML has no null, and msgspec's messages then
# read "expected `array`" instead of "expected `array | null`".
_Strings = list[str] | msgspec.UnsetType


class _RuleDoc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    description: str | msgspec.UnsetType = msgspec.UNSET
    effect: str = "allow"
    actions: list[str]
    topics: list[str]
    subscriptions: _Strings = msgspec.UNSET
    subjects: _Strings = msgspec.UNSET
    roles: _Strings = msgspec.UNSET
    tenants: _Strings = msgspec.UNSET
    certificates: _Strings = msgspec.UNSET
    any_principal: bool = False


# --------------------------------------------------------------------------------------------
# rules and decisions


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: the deciding rule: the first applying deny, else the first applying allow, else None
    rule_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """How one rule relates to one request (for ``securebroker policy check``)."""

    rule_id: str
    effect: Effect
    source: Path
    matched: bool
    #: when matched: what matched; otherwise: every condition that failed
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        verdict = "applies" if self.matched else "does not apply"
        return f"{self.effect.value} rule {self.rule_id!r} {verdict}: {'; '.join(self.reasons)}"


def _fmt(values: Iterable[str]) -> str:
    return "[" + ", ".join(repr(v) for v in sorted(values)) + "]"


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    effect: Effect
    actions: frozenset[Action]
    topics: PatternSet
    source: Path
    #: position in its file (0-based)
    index: int
    description: str | None = None
    subscriptions: PatternSet | None = None
    subjects: frozenset[str] | None = None
    roles: frozenset[str] | None = None
    tenants: frozenset[str] | None = None
    certificates: frozenset[str] | None = None
    any_principal: bool = False

    def principal_matches(self, principal: Principal) -> bool:
        has_token = principal.subject is not None
        if self.subjects is not None and not (has_token and principal.subject in self.subjects):
            return False
        if self.roles is not None and not (
            has_token and not self.roles.isdisjoint(principal.roles)
        ):
            return False
        if self.tenants is not None and not (has_token and principal.tenant in self.tenants):
            return False
        return self.certificates is None or principal.certificate in self.certificates

    def applies(
        self, principal: Principal, action: Action, topic: str, subscription: str | None = None
    ) -> bool:
        # cheapest checks first: set lookups, then pattern matching
        if action not in self.actions or not self.principal_matches(principal):
            return False
        if not self.topics.matches(topic):
            return False
        return (
            self.subscriptions is None
            or action != Action.CONSUME
            or subscription is None
            or self.subscriptions.matches(subscription)
        )

    def explain(
        self, principal: Principal, action: Action, topic: str, subscription: str | None = None
    ) -> RuleMatch:
        hits: list[str] = []
        misses: list[str] = []
        if action in self.actions:
            hits.append(f"action {str(action)!r} listed")
        else:
            misses.append(
                f"action {str(action)!r} not listed ({_fmt(a.value for a in self.actions)})"
            )
        pattern = self.topics.first_match(topic)
        if pattern is not None:
            hits.append(f"topic {topic!r} matches {pattern.text!r}")
        else:
            misses.append(
                f"topic {topic!r} matches no pattern ({_fmt(p.text for p in self.topics)})"
            )
        if self.subscriptions is not None:
            if action != Action.CONSUME:
                hits.append("subscriptions: not checked for this action")
            elif subscription is None:
                hits.append("subscriptions: no subscription given")
            else:
                sub_pattern = self.subscriptions.first_match(subscription)
                if sub_pattern is not None:
                    hits.append(f"subscription {subscription!r} matches {sub_pattern.text!r}")
                else:
                    misses.append(
                        f"subscription {subscription!r} matches no pattern "
                        f"({_fmt(p.text for p in self.subscriptions)})"
                    )
        self._explain_principal(principal, hits, misses)
        return RuleMatch(
            rule_id=self.id,
            effect=self.effect,
            source=self.source,
            matched=not misses,
            reasons=tuple(misses or hits),
        )

    def _explain_principal(self, principal: Principal, hits: list[str], misses: list[str]) -> None:
        if self.any_principal:
            hits.append("any principal")
        token_fields = (
            ("subjects", self.subjects, principal.subject),
            ("tenants", self.tenants, principal.tenant),
        )
        for name, allowed, value in token_fields:
            if allowed is None:
                continue
            if principal.subject is None:
                misses.append(f"{name}: principal has no token")
            elif value is None:
                misses.append(f"{name}: principal has none (want one of {_fmt(allowed)})")
            elif value in allowed:
                hits.append(f"{name}: {value!r} listed")
            else:
                misses.append(f"{name}: {value!r} not in {_fmt(allowed)}")
        if self.roles is not None:
            common = self.roles & principal.roles
            if principal.subject is None:
                misses.append("roles: principal has no token")
            elif common:
                hits.append(f"roles: {_fmt(common)} listed")
            elif not principal.roles:
                misses.append(f"roles: principal has none (want one of {_fmt(self.roles)})")
            else:
                misses.append(f"roles: none of {_fmt(principal.roles)} in {_fmt(self.roles)}")
        if self.certificates is not None:
            if principal.certificate in self.certificates:
                hits.append(f"certificates: {principal.certificate!r} listed")
            else:
                misses.append(
                    f"certificates: {principal.certificate!r} not in {_fmt(self.certificates)}"
                )


class Policy:
    """A loaded, validated policy. Immutable; ``PolicyStore`` swaps whole policies."""

    __slots__ = ("_allow", "_allowed", "_denied", "_deny", "digest", "files", "rules", "source")

    #: the paths the policy was loaded from (as given: files and directories)
    source: tuple[Path, ...]
    #: the files actually read, in load order
    files: tuple[Path, ...]
    #: SHA-256 (hex) of the files' bytes concatenated in load order
    digest: str
    rules: tuple[Rule, ...]
    _deny: dict[Action, tuple[Rule, ...]]
    _allow: dict[Action, tuple[Rule, ...]]
    #: rule id -> the (immutable) decision it produces, built once
    _allowed: dict[str, Decision]
    _denied: dict[str, Decision]

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        source: Sequence[Path] = (),
        files: Sequence[Path] = (),
        digest: str | None = None,
    ) -> None:
        self.rules = tuple(rules)
        self.source = tuple(source)
        self.files = tuple(files)
        self.digest = digest if digest is not None else hashlib.sha256(b"").hexdigest()
        self._deny = {
            a: tuple(r for r in self.rules if r.effect is Effect.DENY and a in r.actions)
            for a in Action
        }
        self._allow = {
            a: tuple(r for r in self.rules if r.effect is Effect.ALLOW and a in r.actions)
            for a in Action
        }
        self._allowed = {r.id: Decision(True, r.id, f"allowed by rule {r.id!r}") for r in rules}
        self._denied = {r.id: Decision(False, r.id, f"denied by rule {r.id!r}") for r in rules}

    @property
    def rule_count(self) -> int:
        return len(self.rules)

    def decide(
        self, principal: Principal, action: Action, topic: str, subscription: str | None = None
    ) -> Decision:
        for rule in self._deny[action]:
            if rule.applies(principal, action, topic, subscription):
                return self._denied[rule.id]
        for rule in self._allow[action]:
            if rule.applies(principal, action, topic, subscription):
                return self._allowed[rule.id]
        what = f"{action} on topic {topic!r}"
        if subscription is not None:
            what += f" with subscription {subscription!r}"
        return Decision(False, None, f"no rule grants {what}")

    def explain(
        self, principal: Principal, action: Action, topic: str, subscription: str | None = None
    ) -> list[RuleMatch]:
        """Every rule, in load order, with why it does or does not apply to the request."""
        return [rule.explain(principal, action, topic, subscription) for rule in self.rules]

    def __repr__(self) -> str:
        return f"Policy(rules={self.rule_count}, files={len(self.files)}, digest={self.digest!r})"


# --------------------------------------------------------------------------------------------
# loading


def _as_paths(paths: Path | str | Sequence[Path | str]) -> tuple[Path, ...]:
    if isinstance(paths, str | os.PathLike):
        return (Path(paths),)
    return tuple(Path(p) for p in paths)


def _policy_files(sources: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    for source in sources:
        if source.is_dir():
            candidates = sorted(
                p for p in source.glob("*.toml") if p.is_file() and not p.name.startswith(".")
            )
        elif source.is_file():
            candidates = [source]
        else:
            raise PolicyError(f"policy path {str(source)!r} does not exist or is not a file")
        for path in candidates:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _field_error(error: msgspec.ValidationError) -> str:
    """msgspec's 'Expected `x`, got `y` - at `$.actions[0]`' -> 'field actions[0]: expected ...'."""
    message = str(error)
    text, sep, where = message.rpartition(" - at `$")
    if not sep:
        return message
    path = where.rstrip("`").lstrip(".")
    return f"field {path!r}: {text[:1].lower()}{text[1:]}" if path else text


def _strings(where: str, field: str, values: _Strings) -> frozenset[str] | None:
    if values is msgspec.UNSET:
        return None
    if not values:
        raise PolicyError(f"{where}: field {field!r} must not be empty (omit it instead)")
    for value in values:
        if not value:
            raise PolicyError(f"{where}: field {field!r} contains an empty string")
    return frozenset(values)


def _patterns(where: str, field: str, values: _Strings) -> PatternSet | None:
    if values is msgspec.UNSET:
        return None
    if not values:
        raise PolicyError(f"{where}: field {field!r} must not be empty (omit it instead)")
    try:
        return PatternSet(compile_pattern(v) for v in values)
    except PatternError as exc:
        raise PolicyError(f"{where}: field {field!r}: {exc.message}") from None


def _build_rule(path: Path, index: int, raw: dict[str, Any]) -> Rule:
    raw_id = raw.get("id")
    usable = isinstance(raw_id, str) and _RULE_ID_RE.fullmatch(raw_id) is not None
    label = f"rule {raw_id!r}" if usable else f"rules[{index}]"
    where = f"{path}: {label}"
    try:
        doc = msgspec.convert(raw, _RuleDoc)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"{where}: {_field_error(exc)}") from None
    if _RULE_ID_RE.fullmatch(doc.id) is None:
        raise PolicyError(
            f"{path}: rules[{index}]: field 'id': {doc.id[:140]!r} is invalid "
            "(1-128 of letters, digits, '_', '.', ':' and '-')"
        )
    try:
        effect = Effect(doc.effect)
    except ValueError:
        raise PolicyError(
            f"{where}: field 'effect': {doc.effect!r} is not 'allow' or 'deny'"
        ) from None
    if not doc.actions:
        raise PolicyError(f"{where}: field 'actions' must not be empty")
    actions: set[Action] = set()
    for name in doc.actions:
        action = _ACTIONS.get(name)
        if action is None:
            raise PolicyError(
                f"{where}: field 'actions': unknown action {name!r} (expected {_ACTION_NAMES})"
            )
        actions.add(action)
    if not doc.topics:
        raise PolicyError(f"{where}: field 'topics' must not be empty")
    topics = _patterns(where, "topics", doc.topics)
    assert topics is not None
    subscriptions = _patterns(where, "subscriptions", doc.subscriptions)
    if subscriptions is not None and Action.CONSUME not in actions:
        raise PolicyError(
            f"{where}: field 'subscriptions' is only allowed on rules whose actions "
            "include 'consume'"
        )
    matchers = {name: _strings(where, name, getattr(doc, name)) for name in _MATCHER_FIELDS}
    has_matchers = any(value is not None for value in matchers.values())
    if doc.any_principal and has_matchers:
        given = ", ".join(name for name, value in matchers.items() if value is not None)
        raise PolicyError(
            f"{where}: field 'any_principal' is true but the rule also lists {given}; "
            "use one or the other"
        )
    if not doc.any_principal and not has_matchers:
        raise PolicyError(
            f"{where}: field 'any_principal': the rule lists no subjects, roles, tenants or "
            "certificates; set any_principal = true to apply it to every principal"
        )
    return Rule(
        id=doc.id,
        effect=effect,
        actions=frozenset(actions),
        topics=topics,
        source=path,
        index=index,
        description=None if doc.description is msgspec.UNSET else doc.description,
        subscriptions=subscriptions,
        subjects=matchers["subjects"],
        roles=matchers["roles"],
        tenants=matchers["tenants"],
        certificates=matchers["certificates"],
        any_principal=doc.any_principal,
    )


def _parse_file(path: Path, data: bytes) -> list[Rule]:
    try:
        doc = msgspec.toml.decode(data, type=_PolicyDoc)
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except msgspec.ValidationError as exc:
        raise PolicyError(f"{path}: {_field_error(exc)}") from None
    except msgspec.DecodeError as exc:
        raise PolicyError(f"{path}: invalid TOML: {exc}") from None
    if doc.version != POLICY_VERSION:
        raise PolicyError(
            f"{path}: field 'version': unsupported policy version {doc.version} "
            f"(expected {POLICY_VERSION})"
        )
    return [_build_rule(path, index, raw) for index, raw in enumerate(doc.rules)]


def load_policy(paths: Path | Sequence[Path]) -> Policy:
    """Load and validate policy files and directories; raise ``PolicyError`` on any problem."""
    sources = _as_paths(paths)
    files = _policy_files(sources)
    digest = hashlib.sha256()
    rules: list[Rule] = []
    first_seen: dict[str, Path] = {}
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
        digest.update(data)
        for rule in _parse_file(path, data):
            previous = first_seen.get(rule.id)
            if previous is not None:
                elsewhere = "earlier in this file" if previous == path else f"in {previous}"
                raise PolicyError(
                    f"{path}: rule {rule.id!r}: field 'id': duplicate rule id "
                    f"(already defined {elsewhere})"
                )
            first_seen[rule.id] = path
            rules.append(rule)
    return Policy(rules, source=sources, files=files, digest=digest.hexdigest())


# --------------------------------------------------------------------------------------------
# reloading

_Stamp = tuple[str, int, int, int] | None


def _stamp(path: Path) -> _Stamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return (path.name, st.st_ino, st.st_mtime_ns, st.st_size)


def _fingerprint(sources: Sequence[Path]) -> tuple[object, ...]:
    """Cheap view of the sources: (name, inode, mtime_ns, size) of every policy file."""
    out: list[object] = []
    for source in sources:
        if source.is_dir():
            try:
                names = sorted(p for p in source.glob("*.toml") if not p.name.startswith("."))
            except OSError:
                names = []
            out.append((str(source), tuple(_stamp(p) for p in names)))
        else:
            out.append((str(source), _stamp(source)))
    return tuple(out)


class PolicyStore:
    """The current policy plus a generation counter; reload it without restarting.

    ``generation`` starts at 1 and increases by one each time ``reload`` installs a policy
    whose content differs from the current one, so callers can key decision caches on it.
    Not thread-safe (one event loop owns it).
    """

    def __init__(self, paths: Path | Sequence[Path]) -> None:
        self._sources = _as_paths(paths)
        self._fingerprint = _fingerprint(self._sources)
        self._policy = load_policy(self._sources)
        self._generation = 1

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def sources(self) -> tuple[Path, ...]:
        return self._sources

    def changed_on_disk(self) -> bool:
        """True if a policy file was added, removed, replaced or modified since the last load
        attempt (by name, inode, mtime and size; no file contents are read)."""
        return _fingerprint(self._sources) != self._fingerprint

    def reload(self) -> bool:
        """Load the policy again from the same paths.

        On any error raise ``PolicyError`` and keep the current policy (``changed_on_disk``
        then stays false until the files change again, so a poll loop reports a bad edit once).
        Return True if the content changed (the digest or the list of files differs) and the
        new policy was installed.
        """
        # stamp before reading: an edit racing the read shows up as a change on the next poll
        self._fingerprint = _fingerprint(self._sources)
        policy = load_policy(self._sources)
        if policy.digest == self._policy.digest and policy.files == self._policy.files:
            return False
        self._policy = policy
        self._generation += 1
        return True
