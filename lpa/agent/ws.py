"""The agent's live job event stream: a thin Autobahn protocol and factory over a session object.

The logic (subscriptions, replay, bounds) lives in :class:`~lpa.agent.ws_session.JobStreamSession`;
this module adapts it to Autobahn and to the transport::

    HTTP GET /api/v1/ws/jobs ─▶ WebSocketResource ─▶ JobStreamProtocol (one per connection)
        onConnect: Autobahn refuses past max_connections with HTTP 503
        onOpen:    register as the transport's push producer, start a session
        onMessage: text ─▶ session.receive_text, binary ─▶ session.receive_binary (error event)
        pause/resumeProducing (transport buffer full/drained) ─▶ session queues/flushes
        onClose:   session.stop()

Close codes, each with a reason (``failByDrop`` is off, so protocol failures get a close frame
rather than a bare TCP drop): 1009 for a frame or message over ``max_message_bytes``, 1007 for
invalid UTF-8 in a text message, 1002 for other protocol errors (all three by Autobahn), 1008 from
the session for a slow consumer past ``send_buffer_events``.  Past ``max_connections`` the
opening handshake is refused with HTTP 503.  Binary frames get an ``error`` event
(``BINARY_NOT_SUPPORTED``), not a 1003 close, so one bad frame does not cost a relay its replay
position.  The server pings every ``ping_interval`` seconds and drops (1006 at the client) a
connection silent for ``ping_timeout`` seconds; client pings are answered.  permessage-deflate
is declined (not tested here).

Autobahn's hooks are called synchronously and nothing awaits them, so they stay synchronous.
Autobahn owns the ``log`` attribute of protocols and factories; ours is ``_log``.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

import autobahn.websocket
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from lpa.agent.eventlog import EventLog
from lpa.agent.ws_session import IStreamChannel, JobStreamSession
from lpa.events import rfc3339, rfc3339_from_epoch

#: how long a client may take to complete the opening and the closing handshake
OPEN_HANDSHAKE_TIMEOUT = 10.0
CLOSE_HANDSHAKE_TIMEOUT = 5.0


@implementer(IPushProducer, IStreamChannel)
class JobStreamProtocol(WebSocketServerProtocol):
    """One client connection; delegates everything but framing to a JobStreamSession."""

    _log = Logger()
    factory: "JobStreamFactory"
    session: JobStreamSession | None = None

    def onConnect(self, request: Any) -> None:
        self._log.info("ws connection from {peer} for {path}", peer=self.peer, path=request.path)
        return None  # no subprotocol

    def onOpen(self) -> None:
        self.become_producer()
        self.session = self.factory.make_session(self)
        self.session.start()

    def become_producer(self) -> None:
        """Hear the transport's "buffer full"/"drained" signals (bounded send queue).

        After WebSocketResource takes the connection over, the HTTP channel is still the
        transport's producer; we are the one producing now, so we take its place.
        """
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None:
            return
        if isBinary:
            self.session.receive_binary()
        else:
            # Autobahn has already validated UTF-8 (or closed with 1007)
            self.session.receive_text(payload.decode("utf-8"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._log.info(
            "ws connection from {peer} closed (clean={clean}, code={code}, reason={reason})",
            peer=self.peer,
            clean=wasClean,
            code=code,
            reason=reason,
        )
        if self.session is not None:
            self.session.stop()

    def connectionLost(self, reason: Any) -> None:
        # Autobahn's onClose hides the real cause (e.g. a TLS verification error); log it.
        self._log.debug("ws transport to {peer} lost: {why}", peer=self.peer, why=reason.value)
        super().connectionLost(reason)
        # Autobahn leaves its close-handshake timer behind when the peer goes away first.
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            call.cancel()
            self.closeHandshakeTimeoutCall = None

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
        # sendClose only allows 1000 and 3000-4999; 1008 (policy) is a protocol-level close
        self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False)

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
    """

    protocol = JobStreamProtocol
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
        url: str | None = None,
    ) -> None:
        if ping_interval <= 0 or ping_timeout <= ping_interval:
            raise ValueError("ping_timeout must be greater than ping_interval > 0")
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
        self._clock = clock
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
