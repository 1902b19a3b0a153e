"""The agent's live job event stream: a thin Autobahn protocol and factory over a session object.

The logic (subscriptions, replay, bounds) lives in :class:`~lpa.agent.ws_session.JobStreamSession`;
this module adapts it to Autobahn and to the transport::

    HTTP GET /api/v1/ws/jobs ─▶ WebSocketResource ─▶ JobStreamProtocol (one per connection)
        onConnect: past max_connections ─▶ HTTP 503 TOO_MANY_CONNECTIONS
                   no "lpa.jobs.v1" in Sec-WebSocket-Protocol ─▶ HTTP 400 SUBPROTOCOL_REQUIRED
                   else select lpa.jobs.v1
        onOpen:    register as the transport's push producer, start a session
        onMessage: text ─▶ session.receive_text, binary ─▶ session.receive_binary (error event)
        pause/resumeProducing (transport buffer full/drained) ─▶ session queues/flushes
        onClose:   session.stop()

The stream is served only under the subprotocol :data:`lpa.protocol.SUBPROTOCOL`.  The
manager's own relay (inside pm-worker) opens this path without a subprotocol and never
subscribes; its handshake fails here, as it always failed against the original agent, and it
falls back to polling ``GET /api/v1/jobs/{id}``.  Every refused handshake is answered with the
JSON envelope (Autobahn alone sends a bare status line) and ``Connection: close``; the
connection is then closed, and aborted if the client has not gone ``CLOSE_HANDSHAKE_TIMEOUT``
seconds later, so a refused client holds no socket.

Close codes, each with a reason (``failByDrop`` is off, so protocol failures get a close frame
rather than a bare TCP drop): 1009 for a frame or message over ``max_message_bytes``, 1007 for
invalid UTF-8 in a text message, 1002 for other protocol errors (all three by Autobahn), 1008 from
the session for a slow consumer past ``send_buffer_events``.  The 1008 close frame is queued
behind what the transport still buffers, so the client reaches it only after reading that:
Autobahn's closing-handshake and auto-ping timeouts (which abort with a reset, discarding the
frame) are replaced for that connection by ``drain_timeout``.  Binary frames get an ``error``
event (``BINARY_NOT_SUPPORTED``), not a 1003 close, so one bad frame does not cost a relay its
replay position.  The server pings every ``ping_interval`` seconds and drops (1006 at the
client) a connection silent for ``ping_timeout`` seconds; client pings are answered.
permessage-deflate is declined (not tested here).

Autobahn's hooks are called synchronously and nothing awaits them, so they stay synchronous.
Autobahn owns the ``log`` attribute of protocols and factories; ours is ``_log``.

The module is a little over 400 lines on purpose: the protocol and the factory that sets every
limit it relies on (and the timers both share) read together, as Twisted's protocol modules do;
the logic that could grow lives in the session.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, Protocol, cast

import autobahn.websocket
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.agent.eventlog import EventLog
from lpa.agent.http.envelope import Enveloper
from lpa.agent.interfaces import IStreamChannel
from lpa.agent.ws_session import JobStreamSession
from lpa.errors import (
    ApiError,
    SubprotocolRequiredError,
    TooManyConnectionsError,
    WebSocketHandshakeError,
)
from lpa.events import rfc3339, rfc3339_from_epoch
from lpa.protocol import SUBPROTOCOL

#: how long a client may take to complete the opening and the closing handshake (and, after a
#: refused handshake, to go away)
OPEN_HANDSHAKE_TIMEOUT = 10.0
CLOSE_HANDSHAKE_TIMEOUT = 5.0
#: how long a client closed as a slow consumer may take to read up to the close frame
DRAIN_TIMEOUT = 30.0
#: subprotocols a refused client offered, as echoed in the log and the error's details
_ECHO_OFFERED = 8


class _Stream(Protocol):
    """The transport under a WebSocket (TCP, or TLS over TCP) as this module uses it.

    Twisted types ``Protocol.transport`` as ``ITransport``, which names neither the consumer
    methods nor ``abortConnection`` that these transports provide.
    """

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def abortConnection(self) -> None: ...


@implementer(IPushProducer, IStreamChannel)
class JobStreamProtocol(WebSocketServerProtocol):
    """One client connection; delegates everything but framing to a JobStreamSession."""

    _log = Logger()
    factory: JobStreamFactory
    session: JobStreamSession | None = None
    #: the error a refused handshake is answered with (None: built from Autobahn's reason)
    _refusal: ApiError | None = None
    #: the opening handshake was refused (logged once, in failHandshake)
    _refused = False
    #: aborts the connection if it outlives a refusal or a slow-consumer close
    _teardown_call: Any = None

    def onConnect(self, request: ConnectionRequest) -> str | None:
        offered = [p[:64] for p in (request.protocols or [])][:_ECHO_OFFERED]
        if SUBPROTOCOL not in (request.protocols or []):
            self._refusal = SubprotocolRequiredError(
                f"The job stream is served only under the WebSocket subprotocol {SUBPROTOCOL}: "
                f"offer it in Sec-WebSocket-Protocol, or poll GET /api/v1/jobs/{{job_id}}",
                {"subprotocol": SUBPROTOCOL, "offered": offered},
            )
            self._log.info(
                "ws connection from {peer} refused: it did not offer the subprotocol "
                "{subprotocol} (offered: {offered}); such clients poll the REST API instead",
                peer=self.peer,
                subprotocol=SUBPROTOCOL,
                offered=", ".join(offered) or "none",
            )
            raise ConnectionDeny(400, "Subprotocol required")
        self._log.info(
            "ws connection from {peer} for {path} ({subprotocol})",
            peer=self.peer,
            path=request.path,
            subprotocol=SUBPROTOCOL,
        )
        return SUBPROTOCOL

    def failHandshake(
        self, reason: str, code: int = 400, responseHeaders: Sequence[Any] | None = None
    ) -> None:
        """Refuse the opening handshake with the JSON envelope, then close the connection.

        Autobahn would send only a status line; every answer of the agent is the envelope.
        A refusal is a deliberate, orderly end (``wasClean``), not a warning in the log.
        """
        error = self._refusal
        if error is None:
            if code == 503:
                error = TooManyConnectionsError(
                    "The agent holds its maximum number of WebSocket connections; retry later",
                    {"max_connections": self.factory.maxConnections},
                )
            else:
                error = WebSocketHandshakeError(f"WebSocket handshake refused: {reason}", code)
            self._log.info(
                "ws handshake from {peer} refused ({status}): {reason}",
                peer=self.peer,
                status=error.http_status,
                reason=reason,
            )
        self._refused = True
        self.wasNotCleanReason = reason
        self.wasClean = True
        self.sendData(self.factory.http_error(error, responseHeaders))
        self.dropConnection(abort=False)
        self._teardown_after(CLOSE_HANDSHAKE_TIMEOUT, "did not go away after its refusal")

    def onOpen(self) -> None:
        self.become_producer()
        self.session = self.factory.make_session(self)
        self.session.start()

    def become_producer(self) -> None:
        """Hear the transport's "buffer full"/"drained" signals (bounded send queue).

        After WebSocketResource takes the connection over, the HTTP channel is still the
        transport's producer; we are the one producing now, so we take its place.
        """
        transport = cast(_Stream, self.transport)
        transport.unregisterProducer()
        transport.registerProducer(self, True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None:
            return
        if isBinary:
            self.session.receive_binary()
        else:
            # Autobahn has already validated UTF-8 (or closed with 1007)
            self.session.receive_text(payload.decode("utf-8"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self._refused:
            self._log.info(
                "ws connection from {peer} closed (clean={clean}, code={code}, reason={reason})",
                peer=self.peer,
                clean=wasClean,
                code=code,
                reason=reason,
            )
        if self.session is not None:
            self.session.stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Autobahn's onClose hides the real cause (e.g. a TLS verification error); log it.
        self._log.debug("ws transport to {peer} lost: {why}", peer=self.peer, why=reason.value)
        super().connectionLost(reason)
        # Autobahn leaves its close-handshake timer behind when the peer goes away first.
        for name in ("closeHandshakeTimeoutCall", "_teardown_call"):
            call = getattr(self, name, None)
            if call is not None:
                call.cancel()
                setattr(self, name, None)

    def _teardown_after(self, seconds: float, why: str) -> None:
        """Abort the connection if it is still there ``seconds`` from now (bounded hold)."""
        if self._teardown_call is not None:
            self._teardown_call.cancel()

        def teardown() -> None:
            self._teardown_call = None
            transport = self.transport
            if transport is None or not getattr(transport, "connected", True):
                return
            self._log.info(
                "ws connection from {peer} {why} in {seconds:g}s; connection aborted",
                peer=self.peer,
                why=why,
                seconds=seconds,
            )
            cast(_Stream, transport).abortConnection()

        self._teardown_call = self.factory._batched_timer.call_later(seconds, teardown)

    def _stop_timers_for_drain(self) -> None:
        """Autobahn's closing-handshake timeout and auto-ping would abort the connection (a
        reset, which discards the buffered close frame) before a slow client could read it."""
        for name in ("closeHandshakeTimeoutCall", "autoPingPendingCall", "autoPingTimeoutCall"):
            call = getattr(self, name, None)
            if call is not None:
                call.cancel()
                setattr(self, name, None)
        self.autoPingInterval = 0
        self.autoPingTimeout = 0
        self.autoPingPending = None

    # -- IStreamChannel --------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        if self.state != WebSocketProtocol.STATE_OPEN:
            # Closing (either side began the closing handshake): nothing more can be delivered;
            # the client resumes with after_seq on its next connection.
            if self.session is not None:
                self.session.stop()
            return
        self.sendMessage(text.encode("utf-8"), isBinary=False)

    def close(self, code: int, reason: str) -> None:
        """Send the close frame and give the client ``drain_timeout`` to read up to it.

        The session has already dropped its unsent frames; the close frame is written behind
        what the transport still buffers (a client that stopped reading has that much to read
        first).  When the client answers the close, Autobahn ends the connection cleanly; when
        it never reads, the connection is aborted after ``drain_timeout``.
        """
        if self.state != WebSocketProtocol.STATE_OPEN:
            return
        # sendClose only allows 1000 and 3000-4999; 1008 (policy) is a protocol-level close
        self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False)
        self._stop_timers_for_drain()
        self._teardown_after(
            self.factory.drain_timeout, f"did not read up to its close frame ({code})"
        )

    # -- IPushProducer (the transport tells us when its buffer is full or drained) ---------

    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.pause_sending()

    def resumeProducing(self) -> None:
        if self.session is not None:
            self.session.resume_sending()

    def stopProducing(self) -> None:
        if self.session is not None:
            self.session.stop()


class _ClockTimer:
    """Autobahn's ``_batched_timer`` seam served by an injected clock (deterministic tests)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return _QuietCall(self._clock.callLater(delay, fn, *args, **kw))


class _WallClock:
    """``seconds()`` for envelope timestamps when no clock is injected."""

    @staticmethod
    def seconds() -> float:
        return time.time()


class _QuietCall:
    """A delayed call whose ``cancel`` is harmless once it ran (as txaio's batched calls)."""

    def __init__(self, call: IDelayedCall) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class JobStreamFactory(WebSocketServerFactory):
    """Builds one JobStreamProtocol per connection, with every limit set explicitly.

    :param events: the EventLog the job engine appends to.
    :param jobs: the ``IJobManager`` (``get`` for subscriptions and snapshots).
    :param clock: timers (auto-ping, handshake timeouts) and timestamps; None means the reactor
        through txaio and the wall clock.
    :param ping_interval: seconds between server pings.
    :param ping_timeout: seconds of silence after which a connection is dropped (> interval).
    :param max_message_bytes: largest frame and message accepted (1009 beyond).
    :param max_subscriptions: job subscriptions per connection (``error`` event beyond).
    :param max_connections: open connections per agent (HTTP 503 on the handshake beyond).
    :param send_buffer_events: frames a connection may have unsent while its transport is full
        (closed with 1008 beyond); keep it above the EventLog's ``max_events_per_job`` so a full
        replay fits.
    :param drain_timeout: seconds a connection closed with 1008 may take to read what was
        already sent and the close frame before its TCP connection is aborted.
    """

    # Twisted's Factory wants a protocol whose `factory` is a Factory[Self]; ours is narrower
    protocol = JobStreamProtocol  # type: ignore[assignment]  # narrower `factory`, see above
    _log = Logger()

    def __init__(
        self,
        events: EventLog,
        jobs: Any,
        *,
        clock: IReactorTime | None = None,
        ping_interval: float = 5.0,
        ping_timeout: float = 10.0,
        max_message_bytes: int = 65536,
        max_subscriptions: int = 256,
        max_connections: int = 64,
        send_buffer_events: int = 2000,
        drain_timeout: float = DRAIN_TIMEOUT,
        url: str | None = None,
    ) -> None:
        if ping_interval <= 0 or ping_timeout <= ping_interval:
            raise ValueError("ping_timeout must be greater than ping_interval > 0")
        if drain_timeout <= 0:
            raise ValueError("drain_timeout must be greater than 0")
        for name, value in (
            ("max_message_bytes", max_message_bytes),
            ("max_subscriptions", max_subscriptions),
            ("max_connections", max_connections),
            ("send_buffer_events", send_buffer_events),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1")
        super().__init__(url=url, server=None)
        self.events = events
        self.jobs = jobs
        self.max_subscriptions = max_subscriptions
        self.send_buffer_events = send_buffer_events
        self.drain_timeout = drain_timeout
        self._clock = clock
        self._enveloper = Enveloper(clock if clock is not None else _WallClock())
        if clock is not None:
            self._batched_timer = _ClockTimer(clock)
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            # Autobahn pings after `interval`, then waits `timeout` for the pong; a connection
            # that went silent just after a pong is dropped `ping_timeout` seconds later.
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout - ping_interval,
            autoPingRestartOnAnyTraffic=True,  # a client's data frames count as signs of life
            openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            maxConnections=max_connections,
            perMessageCompressionAccept=lambda offers: None,
            webStatus=False,
            failByDrop=False,
        )
        self._log.info(
            "WebSocket job stream: autobahn NVX accelerations {nvx}",
            nvx="on" if autobahn.websocket.USES_NVX else "OFF (text receive ~6x slower)",
        )

    def now(self) -> str:
        """An RFC 3339 timestamp from the injected clock (or the wall clock)."""
        if self._clock is None:
            return rfc3339()
        return rfc3339_from_epoch(self._clock.seconds())

    def http_error(self, error: ApiError, headers: Sequence[Any] | None = None) -> bytes:
        """A whole HTTP/1.1 error response carrying the JSON envelope, then the close."""
        body = json.dumps(self._enveloper.envelope(error=error), separators=(",", ":")).encode()
        try:
            phrase = HTTPStatus(error.http_status).phrase
        except ValueError:
            phrase = "Error"
        lines = [
            f"HTTP/1.1 {error.http_status} {phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if error.retry_after is not None:
            lines.append(f"Retry-After: {error.retry_after}")
        lines += [f"{name}: {value}" for name, value in headers or ()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def make_session(self, channel: IStreamChannel) -> JobStreamSession:
        return JobStreamSession(
            self.events,
            self.jobs,
            channel,
            now=self.now,
            connection_id=str(uuid.uuid4()),
            max_subscriptions=self.max_subscriptions,
            send_buffer_events=self.send_buffer_events,
        )


def make_ws_resource(factory: WebSocketServerFactory) -> WebSocketResource:
    """The twisted.web resource to mount at ``/api/v1/ws/jobs`` on the agent's site."""
    return WebSocketResource(factory)
