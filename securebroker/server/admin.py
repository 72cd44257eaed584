"""Admin operations as plain data in, plain data out, for every front door.

The native protocol's ADMIN frame, the CLI and (later) the HTTP API all call ``AdminService.call``
with an operation name and a dict of arguments; results are JSON/MessagePack-safe values.
Arguments are checked here with clear errors, since they come straight from the network.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, Final, Protocol

from securebroker.audit.record import Actor
from securebroker.core.broker import Broker, check_name
from securebroker.core.model import DeadLetter, SubscriptionInfo, TopicInfo
from securebroker.errors import AuthorizationError, ValidationError
from securebroker.server.auth import Action, Authorizer, Principal

Handler = Callable[[Mapping[str, Any], Actor | None], Awaitable[Any]]


def topic_dict(t: TopicInfo) -> dict[str, Any]:
    return {
        "name": t.name,
        "created_at": t.created_at.isoformat(),
        "subscriptions": list(t.subscriptions),
    }


def subscription_dict(s: SubscriptionInfo) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": s.name,
        "topic": s.topic,
        "max_attempts": s.settings.max_attempts,
        "lease_seconds": s.settings.lease.total_seconds(),
        "backoff_base_seconds": s.settings.backoff_base.total_seconds(),
        "backoff_max_seconds": s.settings.backoff_max.total_seconds(),
        "created_at": s.created_at.isoformat(),
    }
    if s.counts is not None:
        out["counts"] = {
            "ready": s.counts.ready,
            "delayed": s.counts.delayed,
            "leased": s.counts.leased,
            "dead": s.counts.dead,
        }
    return out


def dead_letter_dict(d: DeadLetter) -> dict[str, Any]:
    return {
        "message_id": str(d.message_id),
        "subscription": d.subscription,
        "topic": d.topic,
        "idempotency_key": d.idempotency_key,
        "attempts": d.attempts,
        "reason": d.reason,
        "last_error": d.last_error,
        "dead_at": d.dead_at.isoformat(),
        "published_at": d.published_at.isoformat(),
        "history": [dict(h) for h in d.history],
    }


def _str(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ValidationError(f"argument {key!r} is required and must be a string")
    return value


def _opt_int(args: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if type(value) is not int or not lo <= value <= hi:
        raise ValidationError(f"argument {key!r} must be an integer from {lo} to {hi}")
    return value


def _opt_seconds(args: Mapping[str, Any], key: str) -> timedelta | None:
    value = args.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value <= 86_400 * 7:
        raise ValidationError(f"argument {key!r} must be a number of seconds up to 7 days")
    return timedelta(seconds=value)


def _bool(args: Mapping[str, Any], key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise ValidationError(f"argument {key!r} must be true or false")
    return value


def _ids(args: Mapping[str, Any], key: str) -> list[uuid.UUID] | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > 10_000:
        raise ValidationError(f"argument {key!r} must be a list of up to 10000 message ids")
    try:
        return [uuid.UUID(v) for v in value]
    except (TypeError, ValueError, AttributeError):
        raise ValidationError(f"argument {key!r} holds an invalid message id") from None


class AuditReader(Protocol):
    """The auditor operations (``securebroker.audit.service.AuditService``)."""

    def operations(self) -> Mapping[str, Handler]: ...


#: resource marker of the auditor operations
AUDIT_ALL: Final = "\x00audit"
#: the resource the auditor operations are authorized on (action ``audit``): a rule grants
#: them with ``topics = ["securebroker.audit"]`` (or a pattern matching it, such as ``#``)
AUDIT_RESOURCE: Final = "securebroker.audit"

#: ``(action, topic, subscription)`` -> None, or raises ``AuthorizationError``
Check = Callable[[Action, str, str | None], None]
_LISTS = frozenset({"topic.list", "subscription.list"})


class AdminService:
    def __init__(
        self, broker: Broker, authorizer: Authorizer, audit: AuditReader | None = None
    ) -> None:
        self.broker = broker
        self.authorizer = authorizer
        self.audit = audit
        self._ops: dict[str, tuple[Handler, str | None]] = {
            "topic.create": (self._topic_create, "name"),
            "topic.list": (self._topic_list, None),
            "topic.get": (self._topic_get, "name"),
            "topic.delete": (self._topic_delete, "name"),
            "subscription.create": (self._sub_create, "topic"),
            "subscription.list": (self._sub_list, None),
            "subscription.get": (self._sub_get, None),
            "subscription.delete": (self._sub_delete, None),
            "subscription.purge": (self._sub_purge, None),
            "dlq.list": (self._dlq_list, None),
            "dlq.redrive": (self._dlq_redrive, None),
            "dlq.purge": (self._dlq_purge, None),
        }
        if audit is not None:
            for name, handler in audit.operations().items():
                self._ops[name] = (handler, AUDIT_ALL)

    @property
    def operations(self) -> list[str]:
        return sorted(self._ops)

    async def call(
        self,
        principal: Principal,
        op: str,
        args: Mapping[str, Any],
        authorize: Check | None = None,
        actor: Actor | None = None,
    ) -> Any:
        """Run ``op`` if ``principal`` may administer the topic it touches. List operations show
        only the topics (and their subscriptions) the principal may administer. ``authorize``
        lets a front door route the check through its own cache and denial reporting."""
        entry = self._ops.get(op)
        if entry is None:
            raise ValidationError(f"unknown admin operation {op!r}")
        check = authorize or functools.partial(self.authorizer.authorize, principal)
        handler, resource_arg = entry
        if resource_arg is AUDIT_ALL:
            check(Action.AUDIT, AUDIT_RESOURCE, None)
        elif resource_arg is not None:
            check(Action.ADMIN, self._name(args, resource_arg), None)
        elif op in _LISTS:
            topic = args.get("topic")
            if isinstance(topic, str):
                check(Action.ADMIN, topic, None)
        else:
            name = self._name(args, "name")
            check(Action.ADMIN, await self._topic_of(name), name)
        result = await handler(args, actor)
        if op in _LISTS:
            result = [r for r in result if self._may_admin(principal, r)]
        return result

    def _name(self, args: Mapping[str, Any], key: str) -> str:
        """A topic or subscription name argument, checked before anything is decided (or
        recorded) about it."""
        return check_name(f"argument {key!r}:", _str(args, key), self.broker.limits)

    def _may_admin(self, principal: Principal, row: Mapping[str, Any]) -> bool:
        topic = row["topic"] if "topic" in row else row["name"]
        try:
            self.authorizer.authorize(principal, Action.ADMIN, topic)
        except AuthorizationError:
            return False
        return True

    async def _topic_of(self, subscription: str) -> str:
        return (await self.broker.get_subscription(subscription)).topic

    async def _topic_create(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        return topic_dict(await self.broker.create_topic(_str(args, "name"), actor=actor))

    async def _topic_list(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        return [topic_dict(t) for t in await self.broker.list_topics()]

    async def _topic_get(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        return topic_dict(await self.broker.get_topic(_str(args, "name")))

    async def _topic_delete(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        await self.broker.delete_topic(_str(args, "name"), force=_bool(args, "force"), actor=actor)
        return {"deleted": args["name"]}

    async def _sub_create(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        info = await self.broker.create_subscription(
            _str(args, "name"),
            _str(args, "topic"),
            max_attempts=_opt_int(args, "max_attempts", 1, 1000),
            lease=_opt_seconds(args, "lease_seconds"),
            backoff_base=_opt_seconds(args, "backoff_base_seconds"),
            backoff_max=_opt_seconds(args, "backoff_max_seconds"),
            actor=actor,
        )
        return subscription_dict(info)

    async def _sub_list(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        topic = args.get("topic")
        if topic is not None and not isinstance(topic, str):
            raise ValidationError("argument 'topic' must be a string")
        return [subscription_dict(s) for s in await self.broker.list_subscriptions(topic)]

    async def _sub_get(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        return subscription_dict(await self.broker.get_subscription(_str(args, "name")))

    async def _sub_delete(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        await self.broker.delete_subscription(
            _str(args, "name"), force=_bool(args, "force"), actor=actor
        )
        return {"deleted": args["name"]}

    async def _sub_purge(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        return {"purged": await self.broker.purge(_str(args, "name"), actor=actor)}

    async def _dlq_list(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        after = _ids({"after": [args["after"]]} if args.get("after") else {}, "after")
        letters = await self.broker.list_dead(
            _str(args, "name"),
            limit=_opt_int(args, "limit", 1, 10_000) or 100,
            after=after[0] if after else None,
        )
        return [dead_letter_dict(d) for d in letters]

    async def _dlq_redrive(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        n = await self.broker.redrive(_str(args, "name"), _ids(args, "message_ids"), actor=actor)
        return {"redriven": n}

    async def _dlq_purge(self, args: Mapping[str, Any], actor: Actor | None) -> Any:
        return {"purged": await self.broker.purge(_str(args, "name"), dead=True, actor=actor)}
