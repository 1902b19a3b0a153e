"""The relay's WebSocket to one agent: the link's handle, and the dialer that makes one per link.

Three objects per agent, composed rather than inherited from each other::

    AgentWebSocket ── the link's handle (send_json, stop) and the logic: gate, timeout, reports
      ├─ AgentDialler      (lpa.relay.ws_dialler) a ReconnectingClientFactory, knobs only; what
      │                    it redials is the gate, then the connector
      └─ WebSocketClientFactory   Autobahn's own, unchanged: url, protocols=[lpa.jobs.v1],
                                  limits; it builds RelayWebSocketProtocol (lpa.relay.ws_protocol)

    dial ──gate──▶ TCP+TLS (mTLS, ALPN http/1.1) ──handshakeCompleted: ALPN checked──▶ upgrade
      │                                                          │
      │ failed: refused, TLS (e.g. host name mismatch), ALPN,    │ 101, accept key,
      │ status ≠ 101, no lpa.jobs.v1, handshake_timeout          │ subprotocol lpa.jobs.v1
      ▼                                                          ▼
    listener.ws_failed(reason, handshake=True)             listener.ws_opened()
      (the link polls; the dialler redials with backoff)   listener.ws_message(dict) …
                                                           drop → ws_failed(reason, False)

``connectWS`` without TLS options does not verify the server, so we never dial without them.
The real cause of a TLS failure (e.g. a host name mismatch) only reaches ``connectionLost``,
and Autobahn's own close reason ("peer dropped the TCP connection") says nothing; so the reason
we report leads with what we saw ourselves and the transport's cause (:mod:`lpa.relay.reasons`).
A failed handshake is "lost before onOpen", never an awaited ``is_open``.  The relay-wide
:class:`~lpa.relay.backoff.HandshakeGate` caps handshakes in flight after a restart;
:class:`WebSocketDialer` makes one :class:`AgentWebSocket` per link and pauses reading them all
while the store is behind (:mod:`lpa.relay.pressure`).

It runs a little over 400 lines: the handle, its handshake gate and timeout, and the dialer's
pause and resume belong to the one object each link holds; the protocol and the factory already
live in :mod:`lpa.relay.ws_protocol` and :mod:`lpa.relay.ws_dialler`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from lpa import protocol
from lpa.relay.backoff import HandshakeGate
from lpa.relay.interfaces import AgentAddress
from lpa.relay.reasons import describe_transport_failure
from lpa.relay.ws_dialler import AgentDialler, GatedConnector
from lpa.relay.ws_protocol import RelayWebSocketProtocol
from lpa.tls import negotiated_protocol

_log = Logger()

#: a ping every 20 s, and 20 s for its pong: a dead agent is noticed within 40 s (its backstop
#: sweep notices too), while a busy relay whose reactor turns run long (thousands of agents on
#: a loaded box: the timer fires before the pong already waiting in the socket is read) does
#: not drop healthy agents and stampede them with redials, as a 10 s deadline did
AUTO_PING_INTERVAL = 20.0
AUTO_PING_TIMEOUT = 20.0


class IWebSocketListener(Interface):
    """What the per-agent link hears from its WebSocket."""

    def ws_opened() -> None:
        """The handshake succeeded (TLS, ALPN http/1.1, 101, accept key, lpa.jobs.v1)."""

    def ws_message(message: dict[str, Any]) -> None:
        """One JSON object frame from the agent."""

    def ws_failed(reason: str, handshake: bool) -> None:
        """The handshake failed (``handshake``), or an open socket dropped; a redial follows."""


class IAgentWebSocket(Interface):
    """The link's handle on its reconnecting WebSocket."""

    def send_json(message: dict[str, Any]) -> bool:
        """Send one JSON text frame if open; False when not open."""

    def stop() -> Deferred[None]:
        """Stop redialling and close cleanly; fires when the connection is gone."""


def _default_negotiated_protocol(transport: Any) -> str | None:
    value = negotiated_protocol(transport)
    return value.decode("ascii", "replace") if value is not None else None


@implementer(IAgentWebSocket)
class AgentWebSocket:
    """Dials one agent's ``wss://host:port/api/v1/ws/jobs`` and keeps redialling until stopped.

    :param jitter: ReconnectingClientFactory's relative jitter of each redial delay (0: none).
    :param negotiated_protocol: ``transport -> ALPN name or None``; tests over plain memory
        transports inject ``lambda transport: "http/1.1"``.
    """

    def __init__(
        self,
        address: AgentAddress,
        listener: IWebSocketListener,
        *,
        reactor: Any,
        clock: Any,
        tls_options: Any,
        gate: HandshakeGate,
        handshake_timeout: float,
        initial_delay: float,
        max_delay: float,
        jitter: float = ReconnectingClientFactory.jitter,
        negotiated_protocol: Callable[[Any], str | None] = _default_negotiated_protocol,
        auto_ping_interval: float = AUTO_PING_INTERVAL,
        auto_ping_timeout: float = AUTO_PING_TIMEOUT,
    ) -> None:
        if tls_options is None:
            raise ValueError("the relay never dials an agent without TLS options")
        self.address = address
        self.label = f"{address.host}:{address.port}"
        self.listener = listener
        self.negotiated_protocol = negotiated_protocol
        self.handshake_timeout = handshake_timeout
        self._reactor = reactor
        self._clock = clock
        self._tls_options = tls_options
        self._gate = gate
        self.ws_factory = WebSocketClientFactory(
            f"wss://{address.host}:{address.port}{protocol.WS_PATH}",
            reactor=reactor,
            protocols=[protocol.SUBPROTOCOL],
        )
        self.ws_factory.protocol = RelayWebSocketProtocol
        # our clock-driven timeout covers TCP + TLS + upgrade; autobahn's uses the global loop
        self.ws_factory.setProtocolOptions(
            openHandshakeTimeout=0,
            autoPingInterval=auto_ping_interval,
            autoPingTimeout=auto_ping_timeout,
        )
        self.dialler = AgentDialler(
            self, clock=clock, initial_delay=initial_delay, max_delay=max_delay, jitter=jitter
        )
        self.gated = GatedConnector(self)
        self._connector: Any = None
        self._release: Callable[[], None] | None = None
        self._waiting: Deferred[Callable[[], None]] | None = None
        self._timer: IDelayedCall | None = None
        self._timed_out = False
        self._current: RelayWebSocketProtocol | None = None
        self._closed: Deferred[None] | None = None
        self._stopped = False
        self._attempt = 0
        self._paused = False

    @property
    def url(self) -> str:
        return str(self.ws_factory.url)

    # -- dialling --------------------------------------------------------------------------

    def start(self) -> None:
        """Pass the gate, then dial for the first time."""
        self.dial()

    def dial(self) -> None:
        """One attempt: wait for a handshake slot, then connect."""
        if self._stopped:
            return
        self._attempt += 1
        if self._attempt > 1:
            _log.info(
                "redialling agent {agent} (attempt {attempt})",
                agent=self.label,
                attempt=self._attempt,
            )
        waiting = self._gate.acquire()
        self._waiting = waiting
        waiting.addCallbacks(self._granted, lambda failure: failure.trap(CancelledError))

    def _granted(self, release: Callable[[], None]) -> None:
        self._waiting = None
        if self._stopped:
            release()
            return
        self._release = release
        if self._connector is None:
            self._connector = self._reactor.connectSSL(
                self.address.host,
                self.address.port,
                self.dialler,
                self._tls_options,
                timeout=self.handshake_timeout,
            )
        else:
            self._connector.connect()

    def abandon_dial(self) -> bool:
        """Give up a gate wait or a TCP connect in progress; False when there was none."""
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()
            return True
        connector = self._connector
        if connector is not None and getattr(connector, "state", None) == "connecting":
            connector.stopConnecting()
            return True
        return False

    def started_connecting(self) -> None:
        self._timed_out = False
        self._timer = self._clock.callLater(self.handshake_timeout, self._handshake_timed_out)

    def build_protocol(self, addr: Any) -> RelayWebSocketProtocol:
        proto = cast(RelayWebSocketProtocol, self.ws_factory.buildProtocol(addr))
        proto.link = self
        self._current = proto
        return proto

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._timed_out = True
        proto = self._current
        if proto is not None and proto.transport is not None:
            proto.fail(f"opening handshake timed out after {self.handshake_timeout:g}s")
        else:
            self.abandon_dial()

    def _handshake_over(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        release, self._release = self._release, None
        if release is not None:
            release()

    # -- outcomes (from the protocol and the dialler) --------------------------------------

    def handshake_succeeded(self, proto: RelayWebSocketProtocol) -> None:
        self._handshake_over()
        self._attempt = 0
        self.dialler.resetDelay()
        if self._stopped:
            self.dialler.stopTrying()
            return
        _log.info("WebSocket to agent {agent} open", agent=self.label)
        self.listener.ws_opened()
        transport: Any = proto.transport
        if self._paused and transport is not None:
            transport.pauseProducing()

    def connection_failed(self, reason: Failure) -> None:
        self._handshake_over()
        self._current = None
        if self._timed_out:
            cause = f"connection timed out after {self.handshake_timeout:g}s"
        else:
            cause = describe_transport_failure(reason) or "connection failed"
        self._report(cause, handshake=True)

    def connection_lost(self, reason: Failure) -> None:
        self._handshake_over()
        proto, self._current = self._current, None
        opened = proto is not None and proto.opened
        if proto is not None:
            cause = proto.describe_failure()
        else:
            cause = describe_transport_failure(reason) or "connection closed"
        self._report(cause, handshake=not opened)
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)

    def _report(self, cause: str, handshake: bool) -> None:
        if self._stopped:
            return
        if handshake:
            _log.warn(
                "WebSocket handshake with agent {agent} failed: {reason}",
                agent=self.label,
                reason=cause,
            )
        else:
            _log.warn(
                "WebSocket to agent {agent} dropped: {reason}", agent=self.label, reason=cause
            )
        self.listener.ws_failed(cause, handshake)

    # -- used by the link ------------------------------------------------------------------

    def send_json(self, message: dict[str, Any]) -> bool:
        """Send one JSON text frame if the WebSocket is open; False when it is not."""
        proto = self._current
        if proto is None or not proto.opened:
            return False
        proto.sendMessage(protocol.dumps(message).encode("utf-8"), isBinary=False)
        return True

    def pause_reading(self) -> None:
        """Stop reading frames (backpressure: TCP pushes back, the agent keeps its events)."""
        self._paused = True
        transport = self._open_transport()
        if transport is not None:
            transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read frames again."""
        self._paused = False
        transport = self._open_transport()
        if transport is not None:
            transport.resumeProducing()

    def _open_transport(self) -> Any:
        proto = self._current
        return proto.transport if proto is not None and proto.opened else None

    def stop(self, close_timeout: float = 5.0) -> Deferred[None]:
        """Stop redialling and close the connection cleanly; fires once it is gone."""
        self._stopped = True
        if self._paused:
            self.resume_reading()  # the close handshake needs reading
        self.dialler.stopTrying()
        self.abandon_dial()
        proto = self._current
        transport: Any = proto.transport if proto is not None else None
        if proto is None or transport is None:
            self._handshake_over()
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._closed = closed
        if proto.opened:
            proto.sendClose(1000, "relay stopping")
        else:
            transport.abortConnection()
        abort = self._clock.callLater(close_timeout, transport.abortConnection)

        def done(result: Failure | None) -> Failure | None:
            if abort.active():
                abort.cancel()
            return result

        return closed.addBoth(done)


class WebSocketDialer:
    """Makes and starts one :class:`AgentWebSocket` per agent link (production wiring)."""

    def __init__(
        self,
        *,
        reactor: Any,
        clock: Any,
        tls_options_for: Callable[[str], Any],
        gate: HandshakeGate,
        handshake_timeout: float,
        initial_delay: float,
        max_delay: float,
        jitter: float = ReconnectingClientFactory.jitter,
        negotiated_protocol: Callable[[Any], str | None] = _default_negotiated_protocol,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._tls_options_for = tls_options_for
        self._gate = gate
        self._handshake_timeout = handshake_timeout
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self._jitter = jitter
        self._negotiated_protocol = negotiated_protocol
        self._sockets: weakref.WeakSet[AgentWebSocket] = weakref.WeakSet()
        self.paused = False

    def pause_reading(self) -> None:
        """Stop reading every agent WebSocket (and any opened from now on)."""
        self.paused = True
        for websocket in list(self._sockets):
            websocket.pause_reading()

    def resume_reading(self) -> None:
        """Read every agent WebSocket again."""
        self.paused = False
        for websocket in list(self._sockets):
            websocket.resume_reading()

    def __call__(self, address: AgentAddress, listener: IWebSocketListener) -> AgentWebSocket:
        websocket = AgentWebSocket(
            address,
            listener,
            reactor=self._reactor,
            clock=self._clock,
            tls_options=self._tls_options_for(address.host),
            gate=self._gate,
            handshake_timeout=self._handshake_timeout,
            initial_delay=self._initial_delay,
            max_delay=self._max_delay,
            jitter=self._jitter,
            negotiated_protocol=self._negotiated_protocol,
        )
        self._sockets.add(websocket)
        if self.paused:
            websocket.pause_reading()
        websocket.start()
        return websocket
