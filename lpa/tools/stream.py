"""The job stream of one agent for the ``lpa`` command: an Autobahn client, thin, on Twisted.

:func:`open_stream` dials ``wss://HOST:PORT/api/v1/ws/jobs`` offering the subprotocol
:data:`lpa.protocol.SUBPROTOCOL` and fires with an open :class:`JobStream`, or fails with
:class:`HandshakeFailed` (refused, TLS, not 101, no accept key, timeout …) so the caller can poll
instead.  A ``wss`` URL is never dialled without TLS options: ``connectWS`` without them does not
verify the server.  The protocol object only hands text frames to a queue; the caller reads them
with :meth:`JobStream.next_text` (which raises :class:`StreamClosed` once the socket is gone)::

    open_stream ──TCP+TLS+upgrade──▶ onOpen, lpa.jobs.v1 selected: fires JobStream
         │ closed before onOpen / clientConnectionFailed / handshake timeout /
         │ the agent selected no subprotocol or another one
         ▼
    HandshakeFailed(reason)          onMessage(text) ─▶ queue ─▶ next_text()
                                     onClose ─▶ queue: StreamClosed(code, reason)
"""

from __future__ import annotations

import json
from typing import Any, cast

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet.defer import Deferred, DeferredQueue, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from lpa import protocol
from lpa.errors import LpaError

#: frames and messages larger than this are refused (the agent sends one event per frame)
MAX_FRAME_BYTES = 4 * 1024 * 1024


class HandshakeFailed(LpaError):
    """The WebSocket could not be opened; ``str()`` says why."""


class StreamClosed(LpaError):
    """An open WebSocket closed; ``str()`` says how."""


def _describe(failure: Failure | None) -> str:
    if failure is None or failure.check(ConnectionDone):
        return ""
    value = failure.value
    return f"{value.__class__.__name__}: {value}".rstrip(": ")


class _StreamProtocol(WebSocketClientProtocol):
    """Hands everything to its :class:`JobStream`; holds no logic."""

    factory: _StreamFactory

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.lost: Failure | None = None
        #: why we refused an open connection ourselves
        self.refused: str | None = None

    def onOpen(self) -> None:
        selected = self.websocket_protocol_in_use
        if selected != protocol.SUBPROTOCOL:  # not an lpa job stream: poll instead
            self.refused = (f"the agent did not select the subprotocol {protocol.SUBPROTOCOL} "
                            f"(selected: {selected or 'none'})")
            self.dropConnection(abort=True)
            return
        self.opened = True
        self.factory.stream._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.factory.stream._received(payload.decode("utf-8", "replace"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason  # the only place the real cause of a TLS failure shows up
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        parts = [self.refused or getattr(self, "wasNotCleanReason", None) or reason or "",
                 _describe(self.lost)]
        text = "; ".join(dict.fromkeys(part for part in parts if part)) or "connection closed"
        self.factory.stream._closed(self.opened, code, text)


class _StreamFactory(WebSocketClientFactory):
    protocol = _StreamProtocol  # type: ignore[assignment]  # Factory.protocol's stub is narrower
    noisy = False

    def __init__(self, stream: JobStream, url: str, reactor: Any) -> None:
        super().__init__(url, protocols=[protocol.SUBPROTOCOL], reactor=reactor,
                         useragent="lpa-client")
        self.stream = stream
        self.current: _StreamProtocol | None = None
        self.setProtocolOptions(
            openHandshakeTimeout=0,  # ours runs on the injected clock
            autoPingInterval=15,
            autoPingTimeout=10,
            maxFramePayloadSize=MAX_FRAME_BYTES,
            maxMessagePayloadSize=MAX_FRAME_BYTES,
        )

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        self.current = cast(_StreamProtocol, proto)
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.stream._closed(False, None, _describe(reason) or "connection failed")


class JobStream:
    """One connection to an agent's job stream; see the module docstring."""

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._proto: _StreamProtocol | None = None
        self._frames: DeferredQueue[str | None] = DeferredQueue()
        self._open: Deferred[JobStream] = Deferred()
        self._gone: Deferred[None] = Deferred()
        self._closed_reason: str | None = None
        self._timer: IDelayedCall | None = None
        self._timed_out: str | None = None
        self.subprotocol: str | None = None

    # -- from the protocol ---------------------------------------------------------------------

    def _opened(self, proto: _StreamProtocol) -> None:
        self._stop_timer()
        self._proto = proto
        self.subprotocol = proto.websocket_protocol_in_use
        self._open.callback(self)

    def _received(self, text: str) -> None:
        self._frames.put(text)

    def _closed(self, opened: bool, code: int | None, reason: str) -> None:
        self._stop_timer()
        if self._closed_reason is not None:
            return
        self._proto = None
        if not opened:
            self._closed_reason = self._timed_out or reason
            if not self._open.called:
                self._open.errback(HandshakeFailed(self._closed_reason))
        else:
            self._closed_reason = f"the agent closed the WebSocket ({code}: {reason})" \
                if code not in (None, 1000) else f"the agent closed the WebSocket ({reason})"
            self._frames.put(None)
        self._gone.callback(None)

    # -- for the caller ------------------------------------------------------------------------

    def _start_timer(self, abort: Any) -> None:
        def expired() -> None:
            self._timer = None
            self._timed_out = f"no WebSocket handshake within {self._timeout:g}s"
            abort()  # the close that follows reports it

        self._timer = self._clock.callLater(self._timeout, expired)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    async def next_text(self) -> str:
        """The next text frame; raises :class:`StreamClosed` once the socket is gone."""
        if self._closed_reason is not None and not self._frames.pending:
            raise StreamClosed(self._closed_reason)
        text = await self._frames.get()
        if text is None:
            self._frames.put(None)  # every later call fails the same way
            raise StreamClosed(self._closed_reason or "the WebSocket closed")
        return str(text)

    def send(self, frame: dict[str, Any]) -> bool:
        """Send one frame if the socket is open; False when it is not."""
        if self._proto is None:
            return False
        self._proto.sendMessage(json.dumps(frame).encode("utf-8"), isBinary=False)
        return True

    def close(self, grace: float = 5.0) -> Deferred[None]:
        """Close cleanly (1000); abort after ``grace`` seconds; fires once the socket is gone."""
        proto = self._proto
        if proto is None or self._gone.called:
            return succeed(None)
        proto.sendClose(1000, "done")
        abort = self._clock.callLater(grace, proto.dropConnection, True)

        def cancel_abort(result: object) -> object:
            if abort.active():
                abort.cancel()
            return result

        gone: Deferred[None] = Deferred()
        self._gone.addBoth(cancel_abort).addBoth(lambda _: gone.callback(None))
        return gone


def open_stream(
    url: str, *, reactor: Any, clock: IReactorTime, tls_options: Any, timeout: float,
) -> Deferred[JobStream]:
    """Dial ``url`` (``wss://`` or ``ws://``); fires with an open stream or HandshakeFailed."""
    stream = JobStream(clock, timeout)
    factory = _StreamFactory(stream, url, reactor)
    if factory.isSecure and tls_options is None:
        raise ValueError("a wss:// stream is never opened without TLS options")
    connector = connectWS(factory, contextFactory=tls_options, timeout=timeout)

    def abort() -> None:
        proto = factory.current
        if proto is not None and proto.transport is not None:
            cast(Any, proto.transport).abortConnection()
        else:
            connector.stopConnecting()

    stream._start_timer(abort)
    return stream._open
