"""The thin Autobahn protocol of one connection attempt from the relay to an agent.

It holds no relay logic: it checks what the handshake gave (ALPN ``http/1.1`` as soon as TLS
completes, before any HTTP byte is read; the subprotocol ``lpa.jobs.v1`` when the upgrade
completes), hands JSON object frames to the link's listener, and keeps what the operator needs
to read when the attempt fails: our own reason, else the transport's real cause
(:mod:`lpa.relay.reasons`), Autobahn's close text only as a last resort.  Its
``link`` is the :class:`~lpa.relay.ws_client.AgentWebSocket` that built it.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa import protocol
from lpa.protocol import SUBPROTOCOL, ProtocolError
from lpa.relay.reasons import describe_transport_failure

_log = Logger()

#: the only application protocol the relay speaks to agents (h2 breaks WebSocket upgrades)
ALPN_HTTP11 = "http/1.1"
#: connectionLost's default reason, as in Twisted's own protocols
_CLOSED = Failure(ConnectionDone())


def _alpn_refusal(negotiated: str | None) -> str:
    if negotiated == "h2":
        return (
            "the agent chose HTTP/2 (ALPN h2) for the TLS connection; WebSocket needs "
            "http/1.1: offer only http/1.1 in ALPN"
        )
    if negotiated is None:
        return "the agent negotiated no application protocol (ALPN); WebSocket needs http/1.1"
    return f"the agent chose application protocol {negotiated!r} (ALPN), not http/1.1"


@implementer(IHandshakeListener)
class RelayWebSocketProtocol(WebSocketClientProtocol):
    """One connection attempt; reports to its :class:`AgentWebSocket`, holds no relay logic."""

    link: Any  # the AgentWebSocket that built it

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.alpn_checked = False
        #: why we ourselves failed the connection (ALPN, subprotocol, timeout), if we did
        self.fail_reason: str | None = None
        self.lost_reason: Failure | None = None

    def fail(self, reason: str) -> None:
        """End this attempt for ``reason`` (what the operator reads first)."""
        if self.fail_reason is None:
            self.fail_reason = reason
        self.dropConnection(abort=True)

    def _check_alpn(self) -> bool:
        self.alpn_checked = True
        negotiated = self.link.negotiated_protocol(self.transport)
        if negotiated != ALPN_HTTP11:
            self.fail(_alpn_refusal(negotiated))
            return False
        return True

    def handshakeCompleted(self) -> None:
        """TLS is up: check ALPN before a byte of HTTP is read (an h2 answer would stall us)."""
        self._check_alpn()

    def onOpen(self) -> None:
        if self.fail_reason is not None:
            return
        if not self.alpn_checked and not self._check_alpn():
            return
        if self.websocket_protocol_in_use != SUBPROTOCOL:
            self.fail(
                f"the agent did not accept WebSocket subprotocol {SUBPROTOCOL} "
                "(not an lpa agent, or an older one); polling it over REST"
            )
            return
        self.opened = True
        self.link.handshake_succeeded(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        label = self.link.label
        if isBinary:
            _log.warn("agent {agent} sent a binary frame; ignored", agent=label)
            return
        try:
            message = protocol.load_frame(payload)
        except ProtocolError as error:
            _log.warn("agent {agent} sent a bad frame: {error}; ignored", agent=label,
                      error=str(error))
            return
        self.link.listener.ws_message(message)

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        # this is the only place the real cause of a TLS failure shows up
        self.lost_reason = reason
        super().connectionLost(reason)

    def describe_failure(self) -> str:
        """Our own reason when we ended the attempt (what follows our abort is its echo); else
        the transport's cause; Autobahn's close text only as a last resort."""
        if self.fail_reason is not None:
            return self.fail_reason
        cause = describe_transport_failure(self.lost_reason)
        return cause or getattr(self, "wasNotCleanReason", None) or "connection closed"
