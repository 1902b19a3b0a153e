"""Listening on loopback in tests, with the types the real reactor has.

Twisted types the global reactor as its commonly implemented interfaces only (no
``listenSSL``), ``listenTCP``'s factory as a ``ServerFactory`` of one protocol type (which a
``Site`` or an Autobahn factory is not, for the type checker), a listener's address as any
``IAddress`` and ``stopListening`` as maybe returning a Deferred.  These helpers say what the
tests rely on once, so the test modules read without casts.
"""

from __future__ import annotations

from typing import cast

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocolFactory,
    IReactorSSL,
    IReactorTCP,
)
from twisted.internet.protocol import ServerFactory

LOOPBACK = "127.0.0.1"


def listen_tcp(factory: IProtocolFactory, port: int = 0) -> IListeningPort:
    """Listen on loopback (port 0: any free port) with ``factory``."""
    return IReactorTCP(reactor).listenTCP(port, cast(ServerFactory, factory), interface=LOOPBACK)


def listen_ssl(
    factory: IProtocolFactory, options: IOpenSSLContextFactory, port: int = 0
) -> IListeningPort:
    """Listen on loopback with TLS ``options`` (e.g. a ``CertificateOptions``)."""
    return IReactorSSL(reactor).listenSSL(
        port, cast(ServerFactory, factory), options, interface=LOOPBACK
    )


def port_number(listening: IListeningPort) -> int:
    """The TCP port a listener got."""
    address = listening.getHost()
    assert isinstance(address, IPv4Address | IPv6Address), address
    return address.port


async def stop(listening: IListeningPort) -> None:
    """Stop listening and wait until the port is closed."""
    await maybeDeferred(listening.stopListening)


async def started_port(service: StreamServerEndpointService) -> IListeningPort:
    """The port a started endpoint service listens on, once it does."""
    waiting = service._waitingForPort
    assert waiting is not None, "the service was not started"
    port: IListeningPort = await waiting
    return port
