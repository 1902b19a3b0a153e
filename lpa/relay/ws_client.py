"""The relay's WebSocket client to one agent: thin Autobahn protocol, reconnecting factory.

The factory is a ``ReconnectingClientFactory`` whose clock is injected; its ``retry`` takes the
delay from a jittered :class:`~lpa.relay.backoff.Backoff` and passes the relay-wide
:class:`~lpa.relay.backoff.HandshakeGate` before it dials, so a relay restart cannot stampede the
fleet.  Everything the link needs to know arrives through three listener calls::

    dial ──gate──▶ TCP+TLS (client_tls_options: mTLS, ALPN http/1.1) ──▶ HTTP upgrade
      │                                                         │
      │  failed: refused, TLS, status ≠ 101, bad accept key,    │ 101 + accept ok,
      │          ALPN ≠ http/1.1, subprotocol ≠ lpa.jobs.v1,    │ ALPN http/1.1,
      │          handshake_timeout                              │ lpa.jobs.v1
      ▼                                                         ▼
    listener.ws_failed(reason, handshake=True)            listener.ws_opened()
      (the link polls; we retry with backoff)             listener.ws_message(dict) …
                                                          drop → ws_failed(reason, handshake=False)

``connectWS`` without TLS options does not verify the server, so we never dial without them.
The real cause of a TLS failure (e.g. a hostname mismatch) only reaches ``connectionLost``, so
the reason we report is assembled there.  A failed
handshake is "lost before onOpen", never an awaited ``is_open``.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from lpa.protocol import SUBPROTOCOL
from lpa.relay.backoff import Backoff, HandshakeGate
from lpa.relay.interfaces import AgentAddress
from lpa.tls import negotiated_protocol

_log = Logger()

WS_PATH = "/api/v1/ws/jobs"
#: the only application protocol the relay speaks to agents (h2 breaks WebSocket upgrades)
ALPN_HTTP11 = "http/1.1"


class IWebSocketListener(Interface):
    """What the per-agent link hears from its WebSocket."""

    def ws_opened() -> None:
        """The handshake succeeded (TLS, 101, accept key, ALPN http/1.1): send subscriptions."""

    def ws_message(message: dict) -> None:
        """One JSON object frame from the agent."""

    def ws_failed(reason: str, handshake: bool) -> None:
        """The handshake failed (``handshake``), or an open socket dropped; a redial follows."""


class IAgentWebSocket(Interface):
    """The link's handle on its reconnecting WebSocket."""

    def send_json(message: dict) -> bool:
        """Send one JSON text frame if open; False when not open."""

    def stop() -> Deferred:
        """Stop redialling and close cleanly; fires when the connection is gone."""


def _default_negotiated_protocol(transport: Any) -> str | None:
    value = negotiated_protocol(transport)
    return value.decode("ascii", "replace") if value is not None else None


def _describe(failure: Failure | None) -> str:
    if failure is None:
        return ""
    value = failure.value
    text = str(value) or repr(value)
    return f"{value.__class__.__name__}: {text}"


class RelayWebSocketProtocol(WebSocketClientProtocol):
    """One connection attempt; reports to its factory, holds no relay logic."""

    factory: "RelayWebSocketFactory"

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        #: why we ourselves failed the connection (ALPN, timeout), if we did
        self.fail_reason: str | None = None
        self.lost_reason: Failure | None = None

    def onOpen(self) -> None:
        negotiated = self.factory.negotiated_protocol(self.transport)
        if negotiated != ALPN_HTTP11:
            self.fail_reason = (
                f"negotiated application protocol {negotiated!r}, not {ALPN_HTTP11!r}"
            )
            self.dropConnection(abort=True)
            return
        if getattr(self, "websocket_protocol_in_use", None) != SUBPROTOCOL:
            self.fail_reason = f"the agent did not select the subprotocol {SUBPROTOCOL}"
            self.dropConnection(abort=True)
            return
        self.opened = True
        self.factory.handshake_succeeded(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            _log.warn("agent {agent} sent a binary frame; ignored", agent=self.factory.label)
            return
        try:
            message = json.loads(payload.decode("utf-8"))
        except ValueError:
            _log.warn(
                "agent {agent} sent a frame that is not JSON; ignored", agent=self.factory.label
            )
            return
        if not isinstance(message, dict):
            _log.warn(
                "agent {agent} sent a JSON frame that is not an object", agent=self.factory.label
            )
            return
        self.factory.listener.ws_message(message)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        # this is the only place the real cause of a TLS failure shows up
        self.lost_reason = reason
        super().connectionLost(reason)

    def describe_failure(self) -> str:
        parts = [self.fail_reason, getattr(self, "wasNotCleanReason", None)]
        lost = self.lost_reason
        if lost is not None and not lost.check(ConnectionDone):
            parts.append(_describe(lost))
        seen: list[str] = []
        for part in parts:
            if part and part not in seen:
                seen.append(str(part))
        return "; ".join(seen) or "connection closed"


@implementer(IAgentWebSocket)
class RelayWebSocketFactory(WebSocketClientFactory, ReconnectingClientFactory):
    """Dials one agent's ``wss://host:port/api/v1/ws/jobs`` and keeps redialling until stopped."""

    protocol = RelayWebSocketProtocol
    noisy = False  # no "Starting factory" line per dial; we log what matters ourselves

    def __init__(
        self,
        address: AgentAddress,
        listener: IWebSocketListener,
        *,
        reactor: Any,
        clock: Any,
        tls_options: Any,
        gate: HandshakeGate,
        backoff: Backoff,
        handshake_timeout: float,
        negotiated_protocol: Callable[[Any], str | None] = _default_negotiated_protocol,
        auto_ping_interval: float = 15.0,
        auto_ping_timeout: float = 10.0,
    ) -> None:
        if tls_options is None:
            raise ValueError("the relay never dials an agent without TLS options")
        url = f"wss://{address.host}:{address.port}{WS_PATH}"
        WebSocketClientFactory.__init__(self, url, reactor=reactor, protocols=[SUBPROTOCOL])
        # our clock-driven timeout covers TCP + TLS + upgrade; autobahn's uses the global loop
        self.setProtocolOptions(
            openHandshakeTimeout=0,
            autoPingInterval=auto_ping_interval,
            autoPingTimeout=auto_ping_timeout,
        )
        self.address = address
        self.label = f"{address.host}:{address.port}"
        self.listener = listener
        self.clock = clock
        self.tls_options = tls_options
        self.negotiated_protocol = negotiated_protocol
        self.handshake_timeout = handshake_timeout
        self._gate = gate
        self._backoff = backoff
        self._release: Callable[[], None] | None = None
        self._waiting: Deferred | None = None
        self._timer: IDelayedCall | None = None
        self._timed_out = False
        self._current: RelayWebSocketProtocol | None = None
        self._closed: Deferred | None = None
        self.connector: Any = None

    # -- dialling --------------------------------------------------------------------------

    def start(self) -> None:
        """Pass the gate, then dial for the first time."""
        self._dial()

    def _dial(self) -> None:
        waiting = self._gate.acquire()
        self._waiting = waiting

        def granted(release: Callable[[], None]) -> None:
            self._waiting = None
            if not self.continueTrying:
                release()
                return
            self._release = release
            if self.connector is None:
                self.connector = self.reactor.connectSSL(
                    self.address.host,
                    self.address.port,
                    self,
                    self.tls_options,
                    timeout=self.handshake_timeout,
                )
            else:
                self.connector.connect()

        def ignore_cancel(failure: Failure) -> None:
            failure.trap(CancelledError)

        waiting.addCallbacks(granted, ignore_cancel)

    def retry(self, connector: Any = None) -> None:
        """ReconnectingClientFactory's hook: wait a jittered delay, then dial through the gate."""
        if not self.continueTrying:
            return
        delay = self._backoff.next_delay()
        _log.info(
            "reconnecting to agent {agent} in {delay:.2f}s (attempt {attempt})",
            agent=self.label,
            delay=delay,
            attempt=self._backoff.attempts,
        )

        def redial() -> None:
            self._callID = None
            self._dial()

        self._callID = self.clock.callLater(delay, redial)

    def startedConnecting(self, connector: Any) -> None:
        self._timed_out = False
        self._timer = self.clock.callLater(self.handshake_timeout, self._handshake_timed_out)

    def buildProtocol(self, addr: Any) -> RelayWebSocketProtocol:
        proto = WebSocketClientFactory.buildProtocol(self, addr)
        self._current = proto
        return proto

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._timed_out = True
        proto = self._current
        if proto is not None and proto.transport is not None:
            proto.fail_reason = f"opening handshake timed out after {self.handshake_timeout:g}s"
            proto.transport.abortConnection()
        elif self.connector is not None:
            self.connector.stopConnecting()

    def _handshake_over(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        release, self._release = self._release, None
        if release is not None:
            release()

    # -- outcomes --------------------------------------------------------------------------

    def handshake_succeeded(self, proto: RelayWebSocketProtocol) -> None:
        self._handshake_over()
        self._backoff.reset()
        self.resetDelay()
        _log.info("WebSocket to agent {agent} open", agent=self.label)
        self.listener.ws_opened()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._handshake_over()
        self._current = None
        cause = (
            f"connection timed out after {self.handshake_timeout:g}s"
            if self._timed_out
            else _describe(reason)
        )
        self._report(cause, handshake=True)
        self.retry(connector)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self._handshake_over()
        proto, self._current = self._current, None
        opened = proto is not None and proto.opened
        cause = proto.describe_failure() if proto is not None else _describe(reason)
        self._report(cause, handshake=not opened)
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)
        self.retry(connector)

    def _report(self, cause: str, handshake: bool) -> None:
        if not self.continueTrying:
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

    @property
    def is_open(self) -> bool:
        return self._current is not None and self._current.opened

    def send_json(self, message: dict) -> bool:
        """Send one JSON text frame if the WebSocket is open; False when it is not."""
        proto = self._current
        if proto is None or not proto.opened:
            return False
        proto.sendMessage(json.dumps(message).encode("utf-8"), isBinary=False)
        return True

    def stop(self, close_timeout: float = 5.0) -> Deferred:
        """Stop redialling and close the connection cleanly; fires once it is gone."""
        self.stopTrying()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()
        proto = self._current
        if proto is None or proto.transport is None:
            self._handshake_over()
            return succeed(None)
        closed: Deferred = Deferred()
        self._closed = closed
        if proto.opened:
            proto.sendClose(1000, "relay stopping")
        else:
            proto.transport.abortConnection()
        abort = self.clock.callLater(close_timeout, proto.transport.abortConnection)

        def done(result: object) -> object:
            if abort.active():
                abort.cancel()
            return result

        return closed.addBoth(done)


class WebSocketDialer:
    """Makes and starts one :class:`RelayWebSocketFactory` per agent link (production wiring)."""

    def __init__(
        self,
        *,
        reactor: Any,
        clock: Any,
        tls_options_for: Callable[[str], Any],
        gate: HandshakeGate,
        make_backoff: Callable[[], Backoff],
        handshake_timeout: float,
        negotiated_protocol: Callable[[Any], str | None] = _default_negotiated_protocol,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._tls_options_for = tls_options_for
        self._gate = gate
        self._make_backoff = make_backoff
        self._handshake_timeout = handshake_timeout
        self._negotiated_protocol = negotiated_protocol

    def __call__(
        self, address: AgentAddress, listener: IWebSocketListener
    ) -> RelayWebSocketFactory:
        factory = RelayWebSocketFactory(
            address,
            listener,
            reactor=self._reactor,
            clock=self._clock,
            tls_options=self._tls_options_for(address.host),
            gate=self._gate,
            backoff=self._make_backoff(),
            handshake_timeout=self._handshake_timeout,
            negotiated_protocol=self._negotiated_protocol,
        )
        factory.start()
        return factory
