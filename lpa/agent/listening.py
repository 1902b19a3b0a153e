"""The agent's listening ports: how they are made, and what to say and which status to exit
with when the API's port fails.

twistd turns a failed ``listen`` into a 40-line traceback; the agent says it in one line that
names the address, the port and what to do, and exits with a status systemd can act on::

    EADDRINUSE      75 (EX_TEMPFAIL)  another process holds the port; systemd retries
    EACCES          77 (EX_NOPERM)    a port below 1024 without the privilege
    EADDRNOTAVAIL   78 (EX_CONFIG)    server.bind is not an address of this host
    anything else   71 (EX_OSERR)
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError

from lpa.agent.config import AgentConfig
from lpa.agent.metrics import AgentMetrics
from lpa.errors import LpaError
from lpa.metricsweb import MetricsPage

EX_OSERR, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 71, 75, 77, 78

#: listen backlog: a fleet manager may open many connections at once (the default backlog of
#: 50 drops them silently)
LISTEN_BACKLOG = 512


class ListenError(LpaError):
    """The agent cannot listen; ``str()`` is the one line to log, ``exit_status`` the status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def address(host: str, port: int | str) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(
    error: CannotListenError,
    bind: str,
    port: int,
    *,
    keys: tuple[str, str] = ("server.bind", "server.port"),
) -> ListenError:
    """The one-line explanation of a failed listen on ``bind:port``; ``keys`` name the
    configuration keys of that address and port (the advice says which one to change)."""
    bind_key, port_key = keys
    cause: Any = error.socketError
    number = getattr(cause, "errno", None)
    reason = getattr(cause, "strerror", None) or str(cause)
    where = address(bind, port)
    if number == errno.EADDRINUSE:
        advice = (
            f"another process holds the port (ss -ltnp 'sport = :{port}' shows which): stop it, "
            f"or set {port_key}"
        )
        status = EX_TEMPFAIL
    elif number == errno.EACCES:
        advice = (
            f"ports below 1024 need root or CAP_NET_BIND_SERVICE: grant it, or set {port_key} "
            "to 1024 or above"
        )
        status = EX_NOPERM
    elif number == errno.EADDRNOTAVAIL:
        advice = (
            f"{bind} is not an address of this host: set {bind_key} to one of its addresses "
            "(or 0.0.0.0 / ::)"
        )
        status = EX_CONFIG
    else:
        advice, status = f"check {bind_key} and {port_key}", EX_OSERR
    return ListenError(f"cannot listen on {where}: {reason.lower()}; {advice}", status)


class _MetricsListener(StreamServerEndpointService):
    """The /metrics port, whose failed listen names ``metrics.local_bind``/``local_port``
    (the agent's own ``_listening`` would name the API's address and ``server.port``)."""

    def __init__(self, endpoint: Any, factory: Any, bind: str, port: int) -> None:
        super().__init__(endpoint, factory)
        self._bind = bind
        self._port = port

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            raise listen_error(
                error, self._bind, self._port, keys=("metrics.local_bind", "metrics.local_port")
            ) from None


def metrics_listener(
    reactor: Any, config: AgentConfig, metrics: AgentMetrics
) -> StreamServerEndpointService:
    """``metrics.local_port``: /metrics only, plain HTTP, for a scraper on this host."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsPage(metrics.registry))
    site = Site(root)
    site.displayTracebacks = False
    bind = config.metrics.local_bind
    endpoint_class = TCP6ServerEndpoint if ":" in bind else TCP4ServerEndpoint
    port = config.metrics.local_port
    service = _MetricsListener(endpoint_class(reactor, port, interface=bind), site, bind, port)
    service._raiseSynchronously = True
    return service


def ssl6_endpoint(reactor: Any, port: int, context: Any, interface: str) -> Any:
    """An IPv6 TLS listener: TLS wrapped around a TCP6 endpoint."""
    from twisted.internet.interfaces import IStreamServerEndpoint
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from zope.interface import implementer

    tcp = TCP6ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=interface)

    @implementer(IStreamServerEndpoint)
    class _TLS6:
        def listen(self, factory: Any) -> Deferred[Any]:
            listening: Deferred[Any] = tcp.listen(TLSMemoryBIOFactory(context, False, factory))
            return listening

    return _TLS6()
