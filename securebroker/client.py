"""The async Python SDK for securebroker's native protocol.

    async with await connect(cert="client.pem", key="client.key", ca="ca.pem") as client:
        result = await client.publish("payments.authorize", b"...", idempotency_key="order-42")
        async for message in client.consume("payments.authorize.worker", credit=50):
            ...  # act on message.payload
            await message.ack()

Every publish carries an idempotency key (one is generated when the caller gives none), and a
publish interrupted by a lost connection is retried after reconnecting with the *same* key, so
a retry can only ever come back as ``duplicate=True``, never as a second message. Consumers are
re-subscribed on reconnect; deliveries received before the loss keep their lease tokens and can
still be acked while the lease lasts.

Tracing (OpenTelemetry, messaging semantic conventions; ADR 0009): each publish makes a ``send``
span and carries its context in the message's ``trace_context``; ``with message.process():``
wraps the handling of a delivered message in a ``process`` span linked to the producer's; ``ack``
and ``nack`` make ``settle`` spans. Spans go to the global tracer provider, or to the one given
to ``connect(tracer_provider=...)``; with no OpenTelemetry SDK configured they cost next to
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import jwt
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Span, TracerProvider

from securebroker.clock import from_ms, to_ms
from securebroker.core.model import PublishRequest, PublishResult, SettleOutcome
from securebroker.errors import (
    AuthenticationError,
    BrokerError,
    ProtocolError,
    Unavailable,
    from_wire,
)
from securebroker.protocol import codec
from securebroker.protocol import frames as f
from securebroker.telemetry.instrument import ClientTracing
from securebroker.telemetry.semconv import Operation
from securebroker.tls import client_context

log = logging.getLogger("securebroker.client")

CLIENT_NAME = "securebroker-python/0.1"


#: What the SDK publishes is exactly what the core accepts: one vocabulary on both sides.
OutgoingMessage = PublishRequest


def _to_item(m: PublishRequest, key: str) -> f.PublishItem:
    return f.PublishItem(
        topic=m.topic,
        payload=m.payload,
        attributes=dict(m.attributes),
        content_type=m.content_type,
        idempotency_key=key,
        ordering_key=m.ordering_key,
        not_before_ms=None if m.not_before is None else to_ms(m.not_before),
        expires_at_ms=None if m.expires_at is None else to_ms(m.expires_at),
        trace_context=dict(m.trace_context),
    )


class PayloadUnavailable(BrokerError):
    """A delivered message whose payload the broker cannot give (see ``Message.payload``)."""

    code = "payload_unavailable"

    def __init__(self, reason: str, message_id: uuid.UUID) -> None:
        super().__init__(f"payload of message {message_id} unavailable: {reason}")
        self.reason = reason
        self.message_id = message_id


class Message:
    """A delivered message. Settle it exactly once with ``ack`` or ``nack``."""

    def __init__(self, client: Client, frame: f.Deliver) -> None:
        self._client = client
        self.subscription = frame.subscription
        self.topic = frame.topic
        self.id = uuid.UUID(frame.message_id)
        self.lease_token = frame.lease_token
        self.lease_expires_at = from_ms(frame.lease_expires_ms)
        self.attempt = frame.attempt
        self._payload = frame.payload
        #: why there is no payload ("payload_destroyed", "payload_unreadable"), else None
        self.payload_error = frame.payload_error
        self.attributes = frame.attributes
        self.content_type = frame.content_type
        self.idempotency_key = frame.idempotency_key
        self.ordering_key = frame.ordering_key
        self.published_at = from_ms(frame.published_ms)
        self.trace_context = frame.trace_context

    @property
    def payload(self) -> bytes:
        """The message's bytes; raises ``PayloadUnavailable`` when the broker could not give
        them (its scope's keys were destroyed, or it failed authentication). Ack such a message
        (or nack it to dead-letter it): retrying cannot bring the bytes back."""
        if self.payload_error is not None:
            raise PayloadUnavailable(self.payload_error, self.id)
        return self._payload

    def process(self) -> contextlib.AbstractContextManager[Span]:
        """Trace the handling of this message: ``with message.process(): ...`` opens a CONSUMER
        span ``process {topic}``, current inside the block and linked to the producer's span
        (the context the message carries). An exception leaving the block marks the span
        failed and propagates; settle the message yourself, inside or after the block."""
        return self._client._tracing.process(self, body_size=len(self._payload))

    def _item(self) -> f.SettleItem:
        return f.SettleItem(
            subscription=self.subscription, message_id=str(self.id), lease_token=self.lease_token
        )

    async def ack(self) -> None:
        """Settle for good. Raises ``StaleLease`` if the lease expired and moved on.

        Acks issued in the same event-loop turn travel together in one ACK frame (and so in one
        broker transaction); each caller still gets its own result.
        """
        with self._client._tracing.settle(self, Operation.ACK):
            await self._client._acks.submit(self._item())

    async def nack(self, error: str = "", *, delay: timedelta | None = None) -> None:
        """Give it back for redelivery (after backoff, or ``delay``); counts as an attempt."""
        item = f.NackItem(
            subscription=self.subscription,
            message_id=str(self.id),
            lease_token=self.lease_token,
            error=error[:1024],
            delay_ms=None if delay is None else int(delay.total_seconds() * 1000),
        )
        with self._client._tracing.settle(self, Operation.NACK):
            _raise_settle(await self._client.request(f.Nack(items=[item])))

    async def settle(
        self, publish: Sequence[OutgoingMessage] = (), *, settle_id: str | None = None
    ) -> SettleOutcome:
        """Ack this message and publish ``publish`` in one broker transaction: all or nothing
        (``Client.settle``)."""
        return await self._client.settle([self], publish, settle_id=settle_id)

    async def extend(self, lease: timedelta) -> datetime:
        reply = await self._client.request(
            f.Extend(
                subscription=self.subscription,
                message_id=str(self.id),
                lease_token=self.lease_token,
                lease_ms=int(lease.total_seconds() * 1000),
            )
        )
        assert isinstance(reply, f.Extended)
        self.lease_expires_at = from_ms(reply.lease_expires_ms)
        return self.lease_expires_at


def default_settle_id(acks: Sequence[Message]) -> str:
    """A settle id that names what is settled: the acked (subscription, message id) pairs. A
    message is acked at most once, so the same id can only mean a repeat of the same settle."""
    digest = hashlib.sha256()
    for sub, mid in sorted((m.subscription, str(m.id)) for m in acks):
        digest.update(f"{sub}\x00{mid}\x00".encode())
    return f"settle-{digest.hexdigest()[:48]}"


def _raise_settle(reply: f.Frame) -> None:
    assert isinstance(reply, f.Settled)
    for r in reply.results:
        if not r.ok:
            raise from_wire(r.code, r.message)


class _AckBatcher:
    """Coalesces the acks of one event-loop turn into one ACK frame with per-item results."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._items: list[f.SettleItem] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._scheduled = False

    def submit(self, item: f.SettleItem) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._items.append(item)
        self._waiters.append(fut)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        while self._items:
            n = min(len(self._items), f.MAX_BATCH)
            items, waiters = self._items[:n], self._waiters[:n]
            del self._items[:n], self._waiters[:n]
            self._client._spawn(self._send(items, waiters))

    async def _send(self, items: list[f.SettleItem], waiters: list[asyncio.Future[None]]) -> None:
        try:
            reply = await self._client.request(f.Ack(items=items))
        except BaseException as exc:
            for w in waiters:
                if not w.done():
                    w.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        assert isinstance(reply, f.Settled)
        for w, r in zip(waiters, reply.results, strict=True):
            if w.done():
                continue
            if r.ok:
                w.set_result(None)
            else:
                w.set_exception(from_wire(r.code, r.message))


class Subscription:
    """An async iterator of ``Message``; survives reconnects until closed."""

    def __init__(self, client: Client, name: str, credit: int, lease: timedelta | None) -> None:
        self.client = client
        self.name = name
        self.credit = credit
        self.lease = lease
        self.queue: asyncio.Queue[Message | BaseException] = asyncio.Queue()
        self.consumer_id: int | None = None
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        if self.closed:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.closed = True
            if isinstance(item, StopAsyncIteration):
                raise item
            raise item
        return item

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client._subscriptions.discard(self)
        cid = self.consumer_id
        if cid is not None and self.client._link is not None:
            self.client._link.consumers.pop(cid, None)
            with contextlib.suppress(BrokerError):
                await self.client.request(f.Unsubscribe(consumer=cid), retry=False)
        self.queue.put_nowait(StopAsyncIteration())


class _Link:
    """One live connection: a reader task, pending requests, consumer routing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = codec.FrameDecoder(role="client")
        self.pending: dict[int, asyncio.Future[f.Frame]] = {}
        self.consumers: dict[int, Subscription] = {}
        self.ids = itertools.count(1)
        self.lost = asyncio.Event()
        self.subscribe_rids: dict[int, Subscription] = {}
        self.welcome: f.Welcome | None = None
        self.close_reason: str | None = None

    def send(self, frame: f.Frame, rid: int) -> None:
        """Write one frame; raises ``Unavailable`` once the connection is lost or closing.

        (Writing to a TLS transport that has already lost its connection raises an unrelated
        ``AttributeError`` inside asyncio, so the state is checked first.)
        """
        if self.lost.is_set() or self.writer.is_closing():
            raise Unavailable(f"connection lost{_reason(self)}")
        self.writer.write(codec.encode(frame, rid))

    def send_quietly(self, frame: f.Frame, rid: int) -> None:
        """``send`` for frames nobody waits on (PONG, heartbeat PING, CLOSE)."""
        with contextlib.suppress(Unavailable):
            self.send(frame, rid)

    def fail_all(self, exc: BaseException) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()


class Client:
    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None,
        token: str | None,
        reconnect: bool,
        connect_timeout: float,
        retry_for: float,
        token_provider: TokenProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._server_hostname = server_hostname or host
        self._token = token
        self._token_provider = token_provider
        self._reconnect = reconnect
        self._connect_timeout = connect_timeout
        self._retry_for = retry_for
        self._link: _Link | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions: set[Subscription] = set()
        self._acks = _AckBatcher(self)
        self.principal: str | None = None
        self.reconnects = 0
        self._tracing = ClientTracing(
            host=host,
            port=port,
            tracer_provider=tracer_provider,
            propagator=propagator,
            client_id=self._session,
        )

    def _session(self) -> str | None:
        """The broker's session id of the current connection (``messaging.client.id``)."""
        link = self._link
        return None if link is None or link.welcome is None else link.welcome.session

    # -- connection management ---------------------------------------------------------------
    async def _open(self) -> _Link:
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname,
                    limit=2**16,
                )
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        link = _Link(reader, writer)
        writer.write(
            codec.PREAMBLE + codec.encode(f.Hello(client=CLIENT_NAME, token=self._token), 1)
        )
        try:
            async with asyncio.timeout(self._connect_timeout):
                first = await self._read_frames(link, until_first=True)
        except (TimeoutError, ConnectionError, ssl.SSLError) as exc:
            await _close_writer(writer)
            raise AuthenticationError(
                "the broker closed the connection during setup (client certificate refused?)"
            ) from exc
        if isinstance(first, f.Error):
            await _close_writer(writer)
            raise from_wire(first.code, first.message)
        if not isinstance(first, f.Welcome):
            await _close_writer(writer)
            raise ProtocolError(f"expected WELCOME, got {type(first).__name__}")
        link.welcome = first
        self.principal = first.principal
        return link

    async def _read_frames(self, link: _Link, *, until_first: bool = False) -> f.Frame | None:
        while True:
            data = await link.reader.read(65536)
            if not data:
                if until_first:
                    raise ConnectionError("closed before WELCOME")
                return None
            for env in link.decoder.feed(data):
                if until_first:
                    return env.frame
                self._route(link, env)

    def _route(self, link: _Link, env: codec.Envelope) -> None:
        frame = env.frame
        if isinstance(frame, f.Deliver):
            sub = link.consumers.get(frame.consumer)
            if sub is not None:
                sub.queue.put_nowait(Message(self, frame))
            return
        if isinstance(frame, f.Close):
            link.close_reason = frame.reason
            return
        if isinstance(frame, f.Ping):
            link.send_quietly(f.Pong(), env.request_id)
            return
        fut = link.pending.pop(env.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)
            return
        if isinstance(frame, f.Error):
            # A consumer the broker stopped (e.g. its subscription was deleted) is told with an
            # ERROR carrying its SUBSCRIBE request id; anything else is connection-level.
            sub = link.subscribe_rids.pop(env.request_id, None)
            err = from_wire(frame.code, frame.message)
            if sub is not None:
                self._subscriptions.discard(sub)
                sub.queue.put_nowait(err)
            else:
                log.warning("broker error %s: %s", frame.name, frame.message)

    async def _pump(self, link: _Link) -> None:
        try:
            await self._read_frames(link)
        except (ConnectionError, ssl.SSLError, ProtocolError, OSError) as exc:
            log.debug("link lost: %s", exc)
        finally:
            # Detach before failing the pending requests: a request retried from its
            # ``Unavailable`` must find no link (and wait for the next), not this dead one.
            link.lost.set()
            current = self._link is link
            if current:
                self._link = None
                self._ready.clear()
            link.fail_all(Unavailable(f"connection lost{_reason(link)}"))
            if current:
                if not self._closed and self._reconnect:
                    self._spawn(self._reconnect_loop())
                elif not self._closed:
                    for sub in list(self._subscriptions):
                        sub.queue.put_nowait(Unavailable("connection lost"))
            await _close_writer(link.writer)

    async def _heartbeat(self, link: _Link) -> None:
        assert link.welcome is not None
        interval = max(link.welcome.heartbeat_ms / 2000, 0.5)
        while not link.lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await link.lost.wait()
            if not link.lost.is_set():
                link.send_quietly(f.Ping(), 0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attach(self, link: _Link) -> None:
        self._link = link
        self._spawn(self._pump(link))
        self._spawn(self._heartbeat(link))
        for sub in list(self._subscriptions):
            await self._subscribe_on(link, sub)
        self._ready.set()

    async def _reconnect_loop(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                if self._token_provider is not None:
                    self._token = await self._token_provider()
                link = await self._open()
            except BrokerError as exc:
                log.info("reconnect failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await asyncio.Event().wait()
                delay = min(delay * 2, 2.0)
                continue
            self.reconnects += 1
            try:
                await self._attach(link)
            except BrokerError as exc:
                log.info("resubscribe failed: %s", exc)
            return

    async def start(self) -> None:
        if self._token_provider is not None and self._token is None:
            self._token = await self._token_provider()
        await self._attach(await self._open())
        if self._token_provider is not None:
            self._spawn(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        """Refresh the token in-band before it expires (at 80% of its remaining life), so a
        long-lived connection is never closed for an expired token."""
        while not self._closed:
            delay = _refresh_delay(self._token)
            if delay is None:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await asyncio.Event().wait()
            if self._closed or self._token_provider is None:
                return
            try:
                await self.refresh_token(await self._token_provider())
            except BrokerError as exc:
                log.warning("token refresh failed: %s", exc)

    # -- requests ------------------------------------------------------------------------------
    def _send_on(self, link: _Link, frame: f.Frame) -> tuple[int, asyncio.Future[f.Frame]]:
        rid = next(link.ids) + 1  # 1 was the HELLO
        link.send(frame, rid)  # raises Unavailable on a lost link, before anything is pending
        fut: asyncio.Future[f.Frame] = asyncio.get_running_loop().create_future()
        link.pending[rid] = fut
        return rid, fut

    async def request(
        self, frame: f.Frame, *, retry: bool = False, on_subscribe: Subscription | None = None
    ) -> f.Frame:
        """Send one request and wait for its reply; server errors raise their catalogue type.

        With ``retry=True`` a request lost with the connection is resent after reconnecting
        (only for requests that are safe to repeat, such as keyed publishes).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_for
        while True:
            if self._closed:
                raise Unavailable("client is closed")
            link = self._link
            if link is None:
                if not retry or not self._reconnect:
                    raise Unavailable("not connected")
                try:
                    async with asyncio.timeout(max(deadline - loop.time(), 0)):
                        await self._ready.wait()
                except TimeoutError:
                    raise Unavailable("not connected: gave up waiting to reconnect") from None
                continue
            try:
                rid, fut = self._send_on(link, frame)
            except Unavailable:
                if not (retry and self._reconnect and loop.time() < deadline):
                    raise
                # The transport is gone but the reader has not noticed yet: wait until it
                # detaches this link, then wait for the next one.
                try:
                    async with asyncio.timeout(max(deadline - loop.time(), 0)):
                        await link.lost.wait()
                except TimeoutError:
                    raise Unavailable("not connected: gave up waiting to reconnect") from None
                continue
            if isinstance(frame, f.Subscribe) and on_subscribe is not None:
                link.subscribe_rids[rid] = on_subscribe
            try:
                reply = await fut
            except Unavailable:
                if retry and self._reconnect and loop.time() < deadline:
                    continue
                raise
            if isinstance(reply, f.Error):
                err = from_wire(reply.code, reply.message)
                if retry and err.retryable and loop.time() < deadline:
                    continue
                raise err
            return reply

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        attributes: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
        idempotency_key: str | None = None,
        ordering_key: str | None = None,
        not_before: datetime | None = None,
        expires_at: datetime | None = None,
        trace_context: Mapping[str, str] | None = None,
    ) -> PublishResult:
        """Publish one message; returns once it is committed (durable) in the broker."""
        msg = OutgoingMessage(
            topic,
            payload,
            attributes or {},
            content_type,
            idempotency_key,
            ordering_key,
            not_before,
            expires_at,
            trace_context or {},
        )
        return (await self.publish_batch([msg]))[0]

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> list[PublishResult]:
        """Publish atomically: all committed, or none (the error says why)."""
        items = [_to_item(m, m.idempotency_key or str(uuid.uuid4())) for m in messages]
        with self._tracing.send(items) as span:  # injects each message's creation context
            frame: f.Frame = (
                f.Publish(message=items[0]) if len(items) == 1 else f.PublishBatch(messages=items)
            )
            reply = await self.request(frame, retry=True)
            assert isinstance(reply, f.Confirm)
            if len(reply.results) == 1:
                r = reply.results[0]
                self._tracing.confirmed(span, r.message_id, duplicate=r.duplicate)
        return [PublishResult(uuid.UUID(r.message_id), r.duplicate) for r in reply.results]

    async def settle(
        self,
        acks: Sequence[Message],
        publish: Sequence[OutgoingMessage] = (),
        *,
        settle_id: str | None = None,
    ) -> SettleOutcome:
        """Atomic settle (consume-transform-produce): ack ``acks`` and publish ``publish`` in
        one broker transaction. Either everything happens or nothing does: a stale lease or a
        refused output raises, and then nothing was acked or published.

        Safe to retry after an unknown outcome (a lost connection, a crash before the reply):
        the broker keeps each ``settle_id`` (per principal) for the idempotency retention period
        and answers a repeat with the first outcome and ``duplicate=True``. The default id is
        derived from the acked messages, so retrying the same settle, even from a restarted
        process that received the same deliveries again, is recognised. Outputs without an
        idempotency key get ``{settle_id}/{index}``.
        """
        if not acks:
            raise ValueError("a settle acks at least one message")
        sid = settle_id or default_settle_id(acks)
        items = [_to_item(m, m.idempotency_key or f"{sid}/{i}") for i, m in enumerate(publish)]
        frame = f.Settle(settle_id=sid, acks=[m._item() for m in acks], publish=items)
        if items:
            with self._tracing.send(items):  # the outputs carry their creation context
                reply = await self.request(frame, retry=True)
        else:
            reply = await self.request(frame, retry=True)
        assert isinstance(reply, f.SettleConfirm)
        return SettleOutcome(
            [PublishResult(uuid.UUID(r.message_id), r.duplicate) for r in reply.results],
            reply.duplicate,
        )

    def consume(
        self, subscription: str, *, credit: int = 100, lease: timedelta | None = None
    ) -> Subscription:
        """Start consuming; iterate the result. At most ``credit`` messages are unsettled."""
        sub = Subscription(self, subscription, credit, lease)
        self._subscriptions.add(sub)
        self._spawn(self._subscribe_first(sub))
        return sub

    async def _subscribe_first(self, sub: Subscription) -> None:
        link = self._link
        if link is None:
            return  # the reconnect loop subscribes it
        try:
            await self._subscribe_on(link, sub)
        except BrokerError as exc:
            self._subscriptions.discard(sub)
            sub.queue.put_nowait(exc)

    async def _subscribe_on(self, link: _Link, sub: Subscription) -> None:
        if sub.closed:
            return
        frame = f.Subscribe(
            subscription=sub.name,
            credit=sub.credit,
            lease_ms=None if sub.lease is None else int(sub.lease.total_seconds() * 1000),
        )
        reply = await self.request(frame, on_subscribe=sub)
        assert isinstance(reply, f.Subscribed)
        sub.consumer_id = reply.consumer
        link.consumers[reply.consumer] = sub

    async def admin(self, op: str, **args: Any) -> Any:
        reply = await self.request(f.Admin(op=op, args=args))
        assert isinstance(reply, f.AdminResult)
        return reply.result

    async def refresh_token(self, token: str) -> None:
        """Present a fresh bearer token on the live connection (in-band refresh)."""
        self._token = token
        await self.request(f.Auth(token=token))

    async def ping(self) -> None:
        await self.request(f.Ping())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            sub.closed = True
            sub.queue.put_nowait(StopAsyncIteration())
        link = self._link
        self._link = None
        if link is not None:
            link.send_quietly(f.Close(code=0, reason="client closing"), 0)
            await _close_writer(link.writer)
            link.lost.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


#: returns a fresh bearer token (from your identity provider); called at connect, reconnect and
#: before the current token expires
TokenProvider = Callable[[], Awaitable[str]]


def _refresh_delay(token: str | None) -> float | None:
    """Seconds until the token should be refreshed, from its (unverified) ``exp``/``iat``."""
    if token is None:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float):
        return None
    now = datetime.now().timestamp()
    start = iat if isinstance(iat, int | float) else now
    return max(1.0, (exp - now) - 0.2 * (exp - start))


def _reason(link: _Link) -> str:
    return f" ({link.close_reason})" if link.close_reason else ""


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def connect(
    host: str = "127.0.0.1",
    port: int = 7878,
    *,
    cert: str | Path,
    key: str | Path,
    ca: str | Path,
    token: str | None = None,
    token_provider: TokenProvider | None = None,
    server_hostname: str | None = None,
    reconnect: bool = True,
    connect_timeout: float = 10.0,
    retry_for: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
    tracer_provider: TracerProvider | None = None,
    propagator: TextMapPropagator | None = None,
) -> Client:
    """Connect over mutual TLS and say HELLO; raises on refusal (never retries a refusal).

    Pass ``token`` for a fixed bearer token, or ``token_provider`` to have the client fetch one
    at connect and reconnect and refresh it in-band before it expires.

    Spans go to ``tracer_provider`` (default: OpenTelemetry's global provider). Trace context
    travels in messages as W3C ``traceparent``/``tracestate``; pass ``propagator`` (e.g.
    ``opentelemetry.propagate.get_global_textmap()``) to use another (see
    ``securebroker.telemetry.propagation`` for why the default leaves baggage out)."""
    ctx = ssl_context or client_context(cert=Path(cert), key=Path(key), ca=Path(ca))
    client = Client(
        host,
        port,
        ctx,
        server_hostname=server_hostname,
        token=token,
        reconnect=reconnect,
        connect_timeout=connect_timeout,
        retry_for=retry_for,
        token_provider=token_provider,
        tracer_provider=tracer_provider,
        propagator=propagator,
    )
    await client.start()
    return client
