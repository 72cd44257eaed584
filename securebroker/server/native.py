"""The native protocol's listener and connections (DESIGN §5.1, docs/protocol.md).

Ownership at run time (who may touch what):

- ``NativeServer`` owns the listening socket and the set of live ``Connection`` objects.
- Each ``Connection`` is driven by one task (``run``): it reads bytes, feeds the sans-I/O
  decoder and dispatches frames. Requests run as child tasks (pipelining; replies may leave out
  of order, tagged with the request id), bounded by ``max_inflight`` so a fast client cannot
  make the broker queue unbounded work: when the bound is reached the connection stops reading.
- Each subscription on a connection is a ``Consumer`` task that leases messages while the
  consumer has credit (unsettled deliveries < granted credit) and pushes DELIVER frames.
- All writes go through ``Connection.send``, which coalesces frames produced in one loop turn
  into one TLS write.

TLS is started by the connection itself (TCP accept, then ``start_tls``) so that a failed
handshake is seen here, with its reason, rather than swallowed by asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import ssl
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry.trace import Tracer

from securebroker.audit import events as ae
from securebroker.audit.record import Actor, AuditEvent, Event
from securebroker.clock import from_ms, to_ms
from securebroker.core.broker import Broker
from securebroker.core.model import Delivery, NackRef, PublishRequest, SettleRef
from securebroker.errors import (
    AuthenticationError,
    AuthorizationError,
    BrokerError,
    InternalError,
    ProtocolError,
    ResourceExhausted,
    TokenExpired,
    Unavailable,
    ValidationError,
)
from securebroker.protocol import codec
from securebroker.protocol import frames as f
from securebroker.server.admin import AdminService
from securebroker.server.auth import Action, Authenticator, Authorizer, Principal
from securebroker.telemetry import broker as spans
from securebroker.tls import PeerIdentity, identity_from_ssl_object

log = logging.getLogger("securebroker.native")

SERVER_NAME = "securebroker/0.1"
#: authorization decisions kept per connection (cleared whole when full)
DECISION_CACHE_SIZE = 4096
MIN_POLL = 0.005
MAX_POLL = 0.25
RECEIVE_BATCH = 256
REFILL_DELAY = 0.005
LISTEN_BACKLOG = 128
ACCEPT_BACKOFF = 0.1


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    ssl_context: ssl.SSLContext
    host: str = "127.0.0.1"
    port: int = 7878
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    heartbeat: float = 30.0
    max_connections: int = 1000
    max_connections_per_identity: int = 100
    max_inflight: int = 1024
    limits: f.Limits = field(default_factory=f.Limits)
    #: seconds past a token's ``exp`` before its connection is closed (the verifier's leeway)
    token_grace: float = 0.0


class Wakeups:
    """In-process wake-up signals: a publish here wakes this process's idle consumers at once.

    Consumers in other broker processes find new messages by polling with backoff; this is a
    latency shortcut, never a carrier of messages (no per-message LISTEN/NOTIFY).
    """

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def register(self, topic: str, event: asyncio.Event) -> None:
        self._waiters[topic].add(event)

    def unregister(self, topic: str, event: asyncio.Event) -> None:
        self._waiters[topic].discard(event)

    def notify(self, topic: str) -> None:
        for event in self._waiters.get(topic, ()):
            event.set()


def _error_frame(exc: BrokerError) -> f.Error:
    if isinstance(exc, InternalError) and type(exc) is not InternalError:
        # refinements (keyring failures, …) are specific in logs only; opaque on the wire
        log.error("internal error (%s): %s", exc.code, exc.detail or exc.message)
        exc = InternalError("internal error")
    return f.Error(
        code=exc.wire, name=exc.code[:64], message=exc.message[:1024], retryable=exc.retryable
    )


def to_request(item: f.PublishItem) -> PublishRequest:
    return PublishRequest(
        topic=item.topic,
        payload=item.payload,
        attributes=item.attributes,
        content_type=item.content_type,
        idempotency_key=item.idempotency_key,
        ordering_key=item.ordering_key,
        not_before=None if item.not_before_ms is None else from_ms(item.not_before_ms),
        expires_at=None if item.expires_at_ms is None else from_ms(item.expires_at_ms),
        trace_context=item.trace_context,
    )


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationError(f"{what} is not a valid id") from None


class NativeServer:
    def __init__(
        self,
        broker: Broker,
        settings: ListenerSettings,
        *,
        authenticator: Authenticator,
        authorizer: Authorizer,
        admin: AdminService,
        wakeups: Wakeups | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.admin = admin
        self.wakeups = wakeups or Wakeups()
        #: spans of publish, deliver and settle (``[telemetry] traces``); None: no spans at all
        self.tracer = tracer
        self.connections: set[Connection] = set()
        self.per_identity: dict[str, int] = defaultdict(int)
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self.closing = False
        #: handshake and connection-level failures, for the audit seam and tests
        self.on_refused: Callable[[str, str], None] = lambda peer, reason: None
        #: authorization denials ``(peer, principal, reason)``, for the audit seam and tests
        self.on_denied: Callable[[str, str, str], None] = lambda peer, principal, reason: None
        #: security events for the audit trail (``AuditLog.record``); None without auditing
        self.on_audit: Callable[[Iterable[AuditEvent]], None] | None = None

    def refused(self, peer: str, reason: str, actor: Actor | None = None) -> None:
        """A refused connection or token: the security log, and the audit trail."""
        self.on_refused(peer, reason)
        if self.on_audit is not None:
            who = actor or Actor(certificate="", address=peer, protocol="native")
            self.on_audit(
                [ae.security(Event.AUTHENTICATION_FAILED, self.broker.clock.now(), who, reason)]
            )

    @property
    def port(self) -> int:
        assert self._port is not None, "not started"
        return self._port

    async def start(self) -> None:
        """Bind and listen, then accept in a task of our own.

        The server owns its listening socket and hands each accepted socket to
        ``loop.connect_accepted_socket(ssl=...)``, so TLS is the connection's first protocol:
        nothing reads the client's first bytes as plaintext, and the handshake's outcome (or
        its error, for the refusal record) comes back to ``_serve_one``. The obvious
        ``asyncio.start_server`` + ``StreamWriter.start_tls`` strands a ClientHello that the
        plaintext reader got first, and the handshake then hangs until its timeout (CPython
        gh-142352; with uvloop it happens routinely, uvloop issue 707).
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.settings.host,
            self.settings.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        if not infos:
            raise OSError(f"cannot resolve listener address {self.settings.host!r}")
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._port = sock.getsockname()[1]
        self._acceptor = asyncio.ensure_future(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self.closing:
            try:
                conn, _address = await loop.sock_accept(sock)
            except OSError as exc:  # e.g. out of file descriptors: back off, keep listening
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            task = asyncio.ensure_future(self._serve_one(conn))
            self._pending.add(task)
            task.add_done_callback(self._accept_done)

    def _accept_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("connection handler failed", exc_info=exc)

    async def _serve_one(self, sock: socket.socket) -> None:
        try:
            peer = _format_address(sock.getpeername())
        except OSError:
            peer = "unknown peer"
        if self.closing or len(self.connections) >= self.settings.max_connections:
            self.refused(peer, "connection limit reached" if not self.closing else "closing")
            sock.close()
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**16)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            # On failure the loop closes the transport, and with it the socket.
            tls, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=self.settings.ssl_context,
                ssl_handshake_timeout=self.settings.handshake_timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError, asyncio.CancelledError) as exc:
            self.refused(peer, f"tls handshake failed: {exc.__class__.__name__}: {exc}")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        writer = asyncio.StreamWriter(tls, protocol, reader, loop)
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            if ssl_object is None:  # closed as the handshake completed
                raise AuthenticationError("no TLS session")
            identity = identity_from_ssl_object(ssl_object)
        except BrokerError as exc:
            self.refused(peer, f"no usable client certificate: {exc}")
            await _abort(writer)
            return
        if self.per_identity[identity.principal] >= self.settings.max_connections_per_identity:
            self.refused(
                peer,
                f"per-identity connection limit for {identity.principal}",
                Actor(certificate=identity.principal, address=peer, protocol="native"),
            )
            writer.write(
                codec.encode(
                    _error_frame(ResourceExhausted("too many connections for this identity"))
                )
            )
            await _abort(writer)
            return
        conn = Connection(self, reader, writer, identity, peer, next(self._ids))
        self.connections.add(conn)
        self.per_identity[identity.principal] += 1
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.per_identity[identity.principal] -= 1
            if self.per_identity[identity.principal] <= 0:
                del self.per_identity[identity.principal]

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, let connections finish in-flight commits, then close them."""
        self.closing = True
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
            self._acceptor = None
        if self._sock is not None:
            self._sock.close()
        conns = list(self.connections)
        for c in conns:
            c.begin_close(1, "server shutting down")
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.closed.wait()) for c in conns], timeout=grace
            )
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=grace)


def _format_address(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


async def _abort(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


class Consumer:
    def __init__(
        self,
        conn: Connection,
        consumer_id: int,
        subscription: str,
        topic: str,
        credit: int,
        lease: timedelta | None,
    ) -> None:
        self.conn = conn
        self.id = consumer_id
        self.subscription = subscription
        self.topic = topic
        self.window = credit
        self.lease = lease
        self.outstanding: dict[uuid.UUID, datetime] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def settled(self, message_id: uuid.UUID) -> None:
        if self.outstanding.pop(message_id, None) is not None:
            self.wake.set()

    def _drop_expired(self, now: datetime) -> None:
        for mid in [m for m, until in self.outstanding.items() if until <= now]:
            del self.outstanding[mid]

    async def run(self) -> None:
        broker = self.conn.server.broker
        wakeups = self.conn.server.wakeups
        wakeups.register(self.topic, self.wake)
        poll = MIN_POLL
        batching_done = False
        try:
            while True:
                # Clear before looking: a wake-up (settle, credit, publish) that arrives from
                # here on is kept for the next sleep. Clearing only when there is room would let
                # a wake-up at full credit make every later sleep return at once, and the loop
                # would spin without ever yielding to the event loop.
                self.wake.clear()
                now = broker.clock.now()
                self._drop_expired(now)
                free = self.window - len(self.outstanding)
                if free <= 0:
                    await self._sleep(self._until_next_expiry(now))
                    continue
                # Refill in batches: a query per settled message made the dequeue cost per
                # message explode. With little room, wait briefly for more settles (each wakes
                # us) but never longer than REFILL_DELAY, so a client waiting for its whole
                # credit before acking is never stalled.
                if self.outstanding and free < max(1, self.window // 2) and not batching_done:
                    batching_done = not await self._sleep(REFILL_DELAY)
                    continue
                batching_done = False
                try:
                    # a cached lookup; re-decided after a policy reload or token refresh, so a
                    # revoked grant stops deliveries
                    self.conn._authorize(Action.CONSUME, self.topic, self.subscription)
                    batch = await broker.receive(
                        self.subscription,
                        min(free, RECEIVE_BATCH),
                        lease=self.lease,
                        consumer=self.conn.principal_name,
                        actor=self.conn.actor,
                    )
                except BrokerError as exc:
                    if not exc.retryable:
                        self.conn.send(_error_frame(exc), self.conn.subscribe_request[self.id])
                        self.conn.consumers.pop(self.id, None)
                        return
                    await self._sleep(MAX_POLL)
                    continue
                if batch:
                    poll = MIN_POLL
                    tracer = self.conn.server.tracer
                    for d in batch:
                        self.outstanding[d.message_id] = d.lease_expires_at
                        self.conn.send(self._deliver(d))
                        if tracer is not None:
                            spans.delivered(tracer, d, self.conn)
                    await self.conn.drain()
                else:
                    await self._sleep(poll)
                    poll = min(poll * 2, MAX_POLL)
        finally:
            wakeups.unregister(self.topic, self.wake)

    def _until_next_expiry(self, now: datetime) -> float:
        if not self.outstanding:
            return MAX_POLL
        soonest = min(self.outstanding.values())
        return max(0.0, min((soonest - now).total_seconds(), 1.0))

    async def _sleep(self, seconds: float) -> bool:
        """Wait for a wake-up or ``seconds``; True when woken."""
        try:
            async with asyncio.timeout(seconds):
                await self.wake.wait()
        except TimeoutError:
            return False
        return True

    def _deliver(self, d: Delivery) -> f.Deliver:
        return f.Deliver(
            consumer=self.id,
            subscription=d.subscription,
            topic=d.topic,
            message_id=str(d.message_id),
            lease_token=str(d.lease_token),
            lease_expires_ms=to_ms(d.lease_expires_at),
            attempt=d.attempt,
            payload=d.payload,
            attributes=dict(d.attributes),
            content_type=d.content_type,
            idempotency_key=d.idempotency_key,
            ordering_key=d.ordering_key,
            published_ms=to_ms(d.published_at),
            trace_context=dict(d.trace_context),
            payload_error=d.payload_error,
        )


class Connection:
    def __init__(
        self,
        server: NativeServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        identity: PeerIdentity,
        peer: str,
        number: int,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.identity = identity
        self.peer = peer
        self.session = f"{number:x}-{uuid.uuid4().hex[:8]}"
        self.principal: Principal | None = None
        #: who this connection acts as, for the audit trail (set at HELLO and AUTH)
        self.actor = Actor(certificate=identity.principal, address=peer, protocol="native")
        #: authorization decisions of this connection's principal, valid for one policy generation
        self._decisions: dict[tuple[Action, str, str | None], BrokerError | None] = {}
        self._decisions_generation = -1
        self._expiry: asyncio.TimerHandle | None = None
        #: subscription -> topic, for authorizing settles
        self._sub_topics: dict[str, str] = {}
        self.decoder = codec.FrameDecoder(role="server", limits=server.settings.limits)
        self.consumers: dict[int, Consumer] = {}
        self.subscribe_request: dict[int, int] = {}
        self._consumer_ids = itertools.count(1)
        self._inflight: set[asyncio.Future[Any]] = set()
        self._slots = asyncio.Semaphore(server.settings.max_inflight)
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._closing = False
        #: the pending read's timeout while ``run`` waits for input (see ``begin_close``)
        self._read_timeout: asyncio.Timeout | None = None
        self.closed = asyncio.Event()
        #: looked up once (``get_running_loop`` is a ``getpid`` system call each time)
        self._loop = asyncio.get_running_loop()

    @property
    def principal_name(self) -> str:
        return self.principal.name if self.principal else self.identity.principal

    # -- output ------------------------------------------------------------------------------
    def send(self, frame: f.Frame, request_id: int = 0) -> None:
        if self.writer.is_closing():
            return
        self._out.append(codec.encode(frame, request_id))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.writer.is_closing():
            self.writer.write(b"".join(self._out))
        self._out.clear()

    async def drain(self) -> None:
        self._flush()
        if not self.writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    # -- lifecycle -------------------------------------------------------------------------------
    def begin_close(self, code: int, reason: str) -> None:
        """Graceful close: stop consumers and reading; in-flight requests still finish."""
        if self._closing:
            return
        self._closing = True
        for c in self.consumers.values():
            if c.task is not None:
                c.task.cancel()
        self.send(f.Close(code=code, reason=reason))
        # Stop waiting for input by expiring the pending read's timeout. (Not
        # ``reader.feed_eof()``: bytes the peer is still sending would then hit
        # "feed_data after feed_eof" inside the TLS protocol, which aborts the transport and
        # loses the confirms of the commits still in flight.)
        if self._read_timeout is not None and not self._read_timeout.expired():
            self._read_timeout.reschedule(asyncio.get_running_loop().time())

    async def run(self) -> None:
        settings = self.server.settings
        try:
            while not self._closing:
                try:
                    async with asyncio.timeout(settings.idle_timeout) as self._read_timeout:
                        data = await self.reader.read(65536)
                except TimeoutError:
                    if not self._closing:  # else begin_close ended the read
                        self.send(f.Close(code=2, reason="idle timeout"))
                    break
                finally:
                    self._read_timeout = None
                if not data:
                    break
                try:
                    envelopes = self.decoder.feed(data)
                except ProtocolError as exc:
                    self.server.on_refused(self.peer, f"protocol error: {exc}")
                    self.send(_error_frame(exc))
                    break
                for env in envelopes:
                    if self._closing:
                        break
                    try:
                        await self._dispatch(env)
                    except ProtocolError as exc:
                        self.server.on_refused(self.peer, f"protocol error: {exc}")
                        self.send(_error_frame(exc), env.request_id)
                        self._closing = True
                        break
        except (ConnectionError, ssl.SSLError) as exc:
            log.debug("connection %s lost: %s", self.session, exc)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        for c in list(self.consumers.values()):
            if c.task is not None:
                c.task.cancel()
        consumer_tasks = [c.task for c in self.consumers.values() if c.task is not None]
        if consumer_tasks:
            await asyncio.gather(*consumer_tasks, return_exceptions=True)
        if self._inflight:  # finish in-flight commits so their confirms go out
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        self._flush()
        await _abort(self.writer)
        self.closed.set()

    # -- dispatch --------------------------------------------------------------------------------
    async def _dispatch(self, env: codec.Envelope) -> None:
        frame, rid = env.frame, env.request_id
        if self.principal is None:
            if not isinstance(frame, f.Hello):
                raise ProtocolError(f"expected HELLO first, got {frame.NAME}")
            await self._hello(frame, rid)
            return
        match frame:
            case f.Publish(message=item):
                await self._publish_fast([item], rid, single=True)
            case f.PublishBatch(messages=items):
                await self._publish_fast(items, rid, single=False)
            case f.Ack() | f.Nack() | f.Extend() | f.Admin() | f.Settle():
                await self._spawn(self._request(frame, rid))
            case f.Subscribe():
                await self._subscribe(frame, rid)
            case f.Credit():
                c = self.consumers.get(frame.consumer)
                if c is None:
                    raise ProtocolError(f"CREDIT for unknown consumer {frame.consumer}")
                if c.window + frame.credit > settings_max_credit(self):
                    raise ProtocolError("CREDIT would exceed the maximum window")
                c.window += frame.credit
                c.wake.set()
            case f.Unsubscribe():
                c = self.consumers.pop(frame.consumer, None)
                if c is not None and c.task is not None:
                    c.task.cancel()
                self.send(f.Ok(), rid)
            case f.Ping():
                self.send(f.Pong(), rid)
            case f.Pong():
                pass
            case f.Auth():
                await self._auth(frame.token, rid)
            case f.Hello():
                raise ProtocolError("HELLO sent twice")
            case f.Close():
                self.begin_close(0, "bye")
            case _:
                raise ProtocolError(f"unexpected {frame.NAME} frame")

    async def _hello(self, frame: f.Hello, rid: int) -> None:
        try:
            self.principal = await self.server.authenticator.authenticate(
                self.identity, frame.token
            )
        except BrokerError as exc:
            self.server.refused(
                self.peer, f"authentication failed: {exc.detail or exc}", self.actor
            )
            self.send(_error_frame(exc), rid)
            self._closing = True
            return
        self._set_actor()
        self._arm_expiry()
        s = self.server.settings
        self.send(
            f.Welcome(
                version=f.PROTOCOL_VERSION,
                server=SERVER_NAME,
                session=self.session,
                max_frame=s.limits.max_frame,
                max_batch=s.limits.max_batch,
                heartbeat_ms=int(s.heartbeat * 1000),
                principal=self.principal.name[:1024],
            ),
            rid,
        )

    async def _auth(self, token: str, rid: int) -> None:
        """In-band token refresh: same subject (and, for bound tokens, this connection's
        certificate, which the authenticator checks); decisions are re-made under the new token."""
        old = self.principal
        assert old is not None
        try:
            new = await self.server.authenticator.authenticate(self.identity, token)
            if old.subject is not None and new.subject != old.subject:
                raise AuthenticationError(
                    "authentication failed", detail="token refresh names a different subject"
                )
        except BrokerError as exc:
            self.server.refused(self.peer, f"token refresh failed: {exc.detail or exc}", self.actor)
            self.send(_error_frame(exc), rid)
            self.begin_close(exc.wire, "token refresh failed")
            return
        self.principal = new
        self._set_actor()
        self._decisions.clear()
        self._arm_expiry()
        self.send(f.Ok(), rid)

    def _set_actor(self) -> None:
        assert self.principal is not None
        self.actor = Actor(
            certificate=self.identity.principal,
            subject=self.principal.subject,
            address=self.peer,
            protocol="native",
        )

    def _arm_expiry(self) -> None:
        """Close the connection when its token expires without a refresh (DESIGN §4)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        assert self.principal is not None
        expires = self.principal.token_expires_at
        if expires is None:
            return
        grace = self.server.settings.token_grace
        delay = (expires - datetime.now(UTC)).total_seconds() + grace
        self._expiry = asyncio.get_running_loop().call_later(max(delay, 0.0), self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        self.server.refused(
            self.peer, f"token of {self.principal_name!r} expired on a live connection", self.actor
        )
        self.send(_error_frame(TokenExpired("token expired; refresh it with AUTH")), 0)
        self.begin_close(TokenExpired.wire, "token expired")

    async def _spawn(self, work: Awaitable[None]) -> None:
        await self._slots.acquire()
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._inflight.add(task)
        task.add_done_callback(self._done)

    async def _publish_fast(self, items: list[f.PublishItem], rid: int, *, single: bool) -> None:
        """The hot path: no task per request. Validate and authorize now, queue the commit, and
        send the confirm from the commit's completion callback."""
        principal = self.principal
        assert principal is not None
        topics = {i.topic for i in items}
        tracer = self.server.tracer
        span = None if tracer is None else spans.start_publish(tracer, items, self)
        try:
            for topic in topics:
                self._authorize(Action.PUBLISH, topic)
            fut = self.server.broker.submit_publish(
                [to_request(i) for i in items], producer=principal.name, actor=self.actor
            )
        except BrokerError as exc:
            if span is not None:
                spans.end_with_error(span, exc)
            self.send(_error_frame(exc), rid)
            return
        if span is not None:
            fut.add_done_callback(functools.partial(spans.end_publish, span))
        await self._slots.acquire()
        self._inflight.add(fut)
        fut.add_done_callback(functools.partial(self._confirmed, rid, topics))

    def _confirmed(self, rid: int, topics: set[str], fut: asyncio.Future[Any]) -> None:
        self._done(fut)
        if fut.cancelled():
            self.send(_error_frame(Unavailable("broker is shutting down")), rid)
            return
        exc = fut.exception()
        if exc is None:
            results = fut.result()
            for topic in topics:
                self.server.wakeups.notify(topic)
            self.send(
                f.Confirm(
                    results=[
                        f.Confirmed(message_id=str(r.message_id), duplicate=r.duplicate)
                        for r in results
                    ]
                ),
                rid,
            )
        elif isinstance(exc, BrokerError):
            self.send(_error_frame(exc), rid)
        else:
            log.error("publish failed: %s", exc.__class__.__name__)
            self.send(_error_frame(Unavailable("database error")), rid)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _request(self, frame: f.Frame, rid: int) -> None:
        tracer = self.server.tracer
        span = None if tracer is None else spans.start_settle(tracer, frame, self)
        try:
            reply = await self._handle(frame)
        except BrokerError as exc:
            reply = _error_frame(exc)
        except asyncio.CancelledError as exc:
            if span is not None:
                spans.end_with_error(span, exc)
            raise
        except Exception:
            log.exception("internal error handling %s", frame.NAME)
            reply = _error_frame(InternalError("internal error"))
        if span is not None:
            spans.end_settle(span, reply)
        self.send(reply, rid)

    def _authorize(self, action: Action, topic: str, subscription: str | None = None) -> None:
        """Ask the authorizer once per (action, topic, subscription) and policy generation: the
        hot path pays a dict lookup, not a policy evaluation, per message."""
        principal = self.principal
        assert principal is not None
        authorizer = self.server.authorizer
        generation = authorizer.generation
        if generation != self._decisions_generation:
            self._decisions.clear()
            self._decisions_generation = generation
        key = (action, topic, subscription)
        try:
            denied = self._decisions[key]
        except KeyError:
            try:
                authorizer.authorize(principal, action, topic, subscription)
                denied = None
            except AuthorizationError as exc:
                denied = exc
            if len(self._decisions) >= DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = denied
        if denied is not None:
            reason = denied.detail or denied.message
            self.server.on_denied(self.peer, principal.name, reason)
            on_audit = self.server.on_audit
            if on_audit is not None:
                on_audit(
                    [
                        ae.security(
                            Event.AUTHORIZATION_DENIED,
                            self.server.broker.clock.now(),
                            self.actor,
                            reason,
                            topic=topic,
                            subscription=subscription,
                            action=str(action),
                        )
                    ]
                )
            raise AuthorizationError(denied.message, detail=denied.detail)

    async def _settle_topic(self, subscription: str) -> str:
        for c in self.consumers.values():
            if c.subscription == subscription:
                return c.topic
        topic = self._sub_topics.get(subscription)
        if topic is None:
            topic = (await self.server.broker.get_subscription(subscription)).topic
            if len(self._sub_topics) >= DECISION_CACHE_SIZE:
                self._sub_topics.clear()
            self._sub_topics[subscription] = topic
        return topic

    async def _authorize_settle(self, subscriptions: Iterable[str]) -> None:
        for sub in set(subscriptions):
            self._authorize(Action.CONSUME, await self._settle_topic(sub), sub)

    async def _handle(self, frame: f.Frame) -> f.Frame:
        broker = self.server.broker
        principal = self.principal
        assert principal is not None
        match frame:
            case f.Ack(items=items):
                await self._authorize_settle(i.subscription for i in items)
                refs = self._settle_refs(items)
                return self._settled(refs, await broker.ack_batch(refs))
            case f.Nack(items=items):
                await self._authorize_settle(i.subscription for i in items)
                nrefs = [
                    NackRef(
                        i.subscription,
                        _uuid(i.message_id, "message_id"),
                        _uuid(i.lease_token, "lease_token"),
                        i.error,
                        None if i.delay_ms is None else timedelta(milliseconds=i.delay_ms),
                        self.actor,
                    )
                    for i in items
                ]
                return self._settled(nrefs, await broker.nack_batch(nrefs))
            case f.Settle():
                return await self._atomic_settle(frame)
            case f.Extend():
                await self._authorize_settle([frame.subscription])
                ref = SettleRef(
                    frame.subscription,
                    _uuid(frame.message_id, "message_id"),
                    _uuid(frame.lease_token, "lease_token"),
                )
                until = await broker.extend(ref, timedelta(milliseconds=frame.lease_ms))
                for c in self.consumers.values():
                    if c.subscription == frame.subscription and ref.message_id in c.outstanding:
                        c.outstanding[ref.message_id] = until
                return f.Extended(lease_expires_ms=to_ms(until))
            case f.Admin(op=op, args=args):
                result: Any = await self.server.admin.call(
                    principal, op, args, authorize=self._authorize, actor=self.actor
                )
                return f.AdminResult(result=result)
        raise ProtocolError(f"unexpected {frame.NAME} frame")

    def _settle_refs(self, items: Sequence[f.SettleItem]) -> list[SettleRef]:
        return [
            SettleRef(
                i.subscription,
                _uuid(i.message_id, "message_id"),
                _uuid(i.lease_token, "lease_token"),
                self.actor,
            )
            for i in items
        ]

    async def _atomic_settle(self, frame: f.Settle) -> f.SettleConfirm:
        """Acks and publishes in one broker transaction (DESIGN §3.6): every ack's subscription
        must allow consume and every output's topic publish, or nothing is attempted."""
        principal = self.principal
        assert principal is not None
        await self._authorize_settle(i.subscription for i in frame.acks)
        topics = {m.topic for m in frame.publish}
        for topic in topics:
            self._authorize(Action.PUBLISH, topic)
        refs = self._settle_refs(frame.acks)
        outcome = await self.server.broker.settle(
            refs,
            [to_request(m) for m in frame.publish],
            settle_id=frame.settle_id,
            producer=principal.name,
            actor=self.actor,
        )
        for ref in refs:
            for c in self.consumers.values():
                if c.subscription == ref.subscription:
                    c.settled(ref.message_id)
        for topic in topics:
            self.server.wakeups.notify(topic)
        return f.SettleConfirm(
            results=[
                f.Confirmed(message_id=str(r.message_id), duplicate=r.duplicate)
                for r in outcome.results
            ],
            duplicate=outcome.duplicate,
        )

    def _settled(
        self, refs: Sequence[SettleRef | NackRef], results: list[BrokerError | None]
    ) -> f.Settled:
        out = []
        for ref, err in zip(refs, results, strict=True):
            for c in self.consumers.values():
                if c.subscription == ref.subscription:
                    c.settled(ref.message_id)
            if err is None:
                out.append(f.SettleResult(ok=True))
            else:
                out.append(
                    f.SettleResult(ok=False, code=err.wire, name=err.code, message=err.message)
                )
        return f.Settled(results=out)

    def _consumer_ended(self, cid: int, task: asyncio.Task[None]) -> None:
        """A consumer task that ended by an unexpected error must not stall silently: log it
        and tell the client (its SDK raises from the subscription), so it can subscribe again."""
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error("consumer %d of %s failed", cid, self.session, exc_info=exc)
        self.consumers.pop(cid, None)
        rid = self.subscribe_request.get(cid, 0)
        self.send(_error_frame(Unavailable("consumer stopped by an internal error")), rid)

    async def _subscribe(self, frame: f.Subscribe, rid: int) -> None:
        try:
            info = await self.server.broker.get_subscription(frame.subscription)
            self._authorize(Action.CONSUME, info.topic, frame.subscription)
            lease = None if frame.lease_ms is None else timedelta(milliseconds=frame.lease_ms)
            if lease is not None and not (timedelta(seconds=1) <= lease <= timedelta(hours=12)):
                raise ValidationError("lease must be between 1 second and 12 hours")
        except BrokerError as exc:
            self.send(_error_frame(exc), rid)
            return
        cid = next(self._consumer_ids)
        consumer = Consumer(self, cid, frame.subscription, info.topic, frame.credit, lease)
        self.consumers[cid] = consumer
        self.subscribe_request[cid] = rid
        self.send(f.Subscribed(consumer=cid), rid)
        consumer.task = asyncio.ensure_future(consumer.run())
        consumer.task.add_done_callback(functools.partial(self._consumer_ended, cid))


def settings_max_credit(conn: Connection) -> int:
    return conn.server.settings.limits.max_credit


__all__ = ["ListenerSettings", "NativeServer", "Unavailable", "Wakeups"]
