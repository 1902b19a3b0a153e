"""The agent's one Site: HTTP/1.1 only, envelope refusals, deadlines, and a log of refusals.

:class:`AgentSite` serves the API's resource through
:class:`~lpa.agent.http.channel.EnvelopeChannel` with :class:`~lpa.agent.http.gate.BoundedRequest`
requests, and writes the few log lines a peer can cause below the routes, each throttled per kind
(:class:`~lpa.throttle.LogThrottle`)::

    TLS handshake from 10.0.0.9:51234 refused: certificate revoked (CN=old-relay serial=1f)
    request from 10.0.0.9:51234 refused: 431 HEADERS_TOO_LARGE (The request line and …)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Site

from lpa.agent.http.channel import EnvelopeChannel
from lpa.agent.http.envelope import Enveloper
from lpa.agent.http.gate import bounded_request_factory
from lpa.errors import ApiError
from lpa.throttle import LogThrottle, more_like_this
from lpa.tlsaudit import handshake_failure_reason

_log = Logger()


class Http11Site(Site):
    """A Site that never offers HTTP/2 in ALPN, whatever is installed.

    Twisted puts the Site's own protocol list (h2 first when ``h2`` and ``priority`` import)
    ahead of the TLS options' list, and WebSockets break over h2 (autobahn's HTTP/2 branch fails
    the upgrade): the agent's one port must speak HTTP/1.1 only.
    """

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


def _peer(transport: Any) -> str:
    try:
        address = transport.getPeer()
    except Exception:
        return "?"
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AgentSite(Http11Site):
    """The Site of :meth:`lpa.agent.http.api.AgentApi.site`.

    :param timeout_seconds: ``server.timeout_seconds``: how long a client may take to send a
        whole request (and to finish the TLS handshake); None for no limit.
    :param clock: timers and timestamps (the reactor in production).
    :param throttle: bounds the refusal log lines (one per process is enough).
    """

    protocol = EnvelopeChannel  # type: ignore[assignment]  # HTTP/1.1 only; typed for HTTPChannel

    def __init__(
        self,
        resource: IResource,
        *,
        enveloper: Enveloper,
        max_body_bytes: int,
        timeout_seconds: float | None,
        clock: IReactorTime,
        throttle: LogThrottle | None = None,
    ) -> None:
        super().__init__(
            resource,
            requestFactory=bounded_request_factory(max_body_bytes),
            timeout=timeout_seconds,
            reactor=clock,
        )
        self.displayTracebacks = False
        self.enveloper = enveloper
        self.timeout_seconds = timeout_seconds
        self.throttle = throttle if throttle is not None else LogThrottle(clock)
        #: told the kind of every refused handshake, before the log throttle (the metrics)
        self.on_handshake_refused: Callable[[str], object] = lambda kind: None
        #: told every request the connection refused before routing (414, 431, 408, 413, a bad
        #: request line), before the log throttle (the metrics)
        self.on_request_refused: Callable[[ApiError], object] = lambda error: None

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.timeout_seconds = self.timeout_seconds
        return channel

    # -- what the channels report ------------------------------------------------------------

    def request_refused(self, transport: Any, error: ApiError) -> None:
        self.on_request_refused(error)
        suppressed = self.throttle.admit(f"http:{error.code}")
        if suppressed is None:
            return
        _log.info(
            "request from {peer} refused: {status} {code} ({reason}){more}",
            peer=_peer(transport),
            status=error.http_status,
            code=error.code,
            reason=error.message,
            more=more_like_this(suppressed),
            suppressed=suppressed,
        )

    def handshake_failed(self, transport: Any, reason: Failure) -> None:
        refusal = handshake_failure_reason(transport, reason)
        if refusal is not None:
            self._handshake_refused(transport, refusal.kind, refusal.describe())

    def handshake_timed_out(self, transport: Any) -> None:
        kind = "handshake not completed in time"
        self._handshake_refused(
            transport, kind, f"{kind} ({self.timeout_seconds:g} s, server.timeout_seconds)"
        )

    def _handshake_refused(self, transport: Any, kind: str, reason: str) -> None:
        self.on_handshake_refused(kind)
        suppressed = self.throttle.admit(f"tls:{kind}")
        if suppressed is None:
            return
        _log.warn(
            "TLS handshake from {peer} refused: {reason}{more}",
            peer=_peer(transport),
            reason=reason,
            kind=kind,
            more=more_like_this(suppressed),
            suppressed=suppressed,
        )
