"""The per-agent redial policy: Twisted's ``ReconnectingClientFactory``, through its knobs only.

:class:`AgentDialler` is what ``connectSSL`` is given for one agent.  It is ClientFactory's own
hooks (``buildProtocol``, ``startedConnecting``, ``clientConnection*``) telling the
:class:`~lpa.relay.ws_client.AgentWebSocket`, then ReconnectingClientFactory scheduling the
redial with its documented knobs (``clock``, ``initialDelay``, ``maxDelay``, ``factor``,
``jitter``, ``resetDelay``, ``stopTrying``) — never its private ``_callID``.  What it redials is a
:class:`GatedConnector`: the relay-wide handshake gate first
(:class:`~lpa.relay.backoff.HandshakeGate`), then the real connector::

    redial ─▶ GatedConnector.connect() ─▶ AgentWebSocket.dial(): gate, then connectSSL/connect
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.error import NotConnectingError
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.python.failure import Failure

from lpa.relay.ws_protocol import RelayWebSocketProtocol

if TYPE_CHECKING:
    from lpa.relay.ws_client import AgentWebSocket


class GatedConnector:
    """What the dialler redials: the handshake gate first, then the real connector."""

    def __init__(self, websocket: AgentWebSocket) -> None:
        self._websocket = websocket

    def connect(self) -> None:
        self._websocket.dial()

    def stopConnecting(self) -> None:
        if not self._websocket.abandon_dial():
            raise NotConnectingError()

    def getDestination(self) -> Any:
        return self._websocket.address


class AgentDialler(ReconnectingClientFactory):
    """The per-agent redial policy: Twisted's ReconnectingClientFactory, knobs only.

    ``buildProtocol``, ``startedConnecting`` and ``clientConnection*`` are ClientFactory's own
    hooks; they tell the :class:`AgentWebSocket` and then let ReconnectingClientFactory
    schedule the redial, of the gated connector.
    """

    noisy = False  # no "Starting factory" line per dial; AgentWebSocket logs what matters

    def __init__(
        self,
        websocket: AgentWebSocket,
        *,
        clock: Any,
        initial_delay: float,
        max_delay: float,
        factor: float = 2.0,
        jitter: float = ReconnectingClientFactory.jitter,
    ) -> None:
        self.websocket = websocket
        self.clock = clock
        self.initialDelay = initial_delay
        self.maxDelay = max_delay  # type: ignore[assignment]  # Twisted's default is an int
        self.factor = factor
        self.jitter = jitter
        self.resetDelay()

    def buildProtocol(self, addr: Any) -> RelayWebSocketProtocol:
        return self.websocket.build_protocol(addr)

    def startedConnecting(self, connector: Any) -> None:
        self.websocket.started_connecting()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.websocket.connection_failed(reason)
        ReconnectingClientFactory.clientConnectionFailed(self, self.websocket.gated, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self.websocket.connection_lost(reason)
        ReconnectingClientFactory.clientConnectionLost(self, self.websocket.gated, reason)
