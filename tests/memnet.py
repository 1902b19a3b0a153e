"""An in-memory network on a ``task.Clock`` for relay ↔ agent tests: no sockets, no sleeping.

:class:`MemoryNetwork` is a :class:`~twisted.internet.task.Clock` with ``connectSSL``: each dial
reaches the server factory registered for ``(host, port)`` through ``twisted.test.iosim``
transports (plain bytes; TLS itself is covered by the real-loopback tests), or is refused when
nothing listens, or hangs when the address is ``silent``.  The client's factory hears
``startedConnecting``, ``clientConnectionFailed`` and ``clientConnectionLost`` as from a real
connector, so a ``ReconnectingClientFactory`` redials as it would on a reactor.

Usage::

    network = MemoryNetwork()
    network.listen("agent1.example", 12443, site)
    ... code under test calls network.connectSSL(...) ...
    network.flush()                  # complete connects, move bytes until nothing moves
    network.advance(5)               # time passes (flush again to move what it caused)
    network.kill("agent1.example", 12443)    # agent crash: listener gone, connections dropped
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim


class _ClientTransport(iosim.FakeTransport):
    """The dialling side: its loss also reaches the connector (and so the client factory)."""

    def __init__(self, protocol: Any, connector: MemoryConnector) -> None:
        super().__init__(protocol, isServer=False)
        self.connector = connector

    def reportDisconnect(self) -> None:
        reason = Failure(self.disconnectReason)
        self.protocol.connectionLost(reason)
        self.connector.lost(reason)


class MemoryConnector:
    """An ``IConnector`` whose connections are iosim pumps in a :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork, host: str, port: int, factory: Any) -> None:
        self.network = network
        self.host = host
        self.port = port
        self.factory = factory
        self.state = "disconnected"
        self.attempts = 0

    def connect(self) -> None:
        self.state = "connecting"
        self.attempts += 1
        self.network.dials.append((self.host, self.port))
        self.factory.startedConnecting(self)
        self.network.callLater(0, self._complete)

    def _complete(self) -> None:
        if self.state != "connecting":
            return
        address = (self.host, self.port)
        if address in self.network.silent:
            return  # TCP accepted, nothing ever answers
        server_factory = self.network.servers.get(address)
        if server_factory is None:
            self.state = "disconnected"
            self.factory.clientConnectionFailed(self, Failure(error.ConnectionRefusedError()))
            return
        self.state = "connected"
        client = self.factory.buildProtocol(None)
        server = server_factory.buildProtocol(None)
        client_io = _ClientTransport(client, self)
        server_io = iosim.makeFakeServer(server)
        pump = iosim.connect(server, server_io, client, client_io, greet=False, clock=self.network)
        self.network.pumps.append((address, pump))

    def stopConnecting(self) -> None:
        if self.state != "connecting":
            raise error.NotConnectingError()
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, Failure(error.UserError()))

    def disconnect(self) -> None:
        for _address, pump in self.network.pumps:
            if pump.clientIO.connector is self:
                pump.clientIO.loseConnection()

    def lost(self, reason: Failure) -> None:
        self.state = "disconnected"
        self.factory.clientConnectionLost(self, reason)

    def getDestination(self) -> Any:
        return (self.host, self.port)


class MemoryNetwork(Clock):
    """A Clock that is also the relay's reactor for ``connectSSL`` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.servers: dict[tuple[str, int], Any] = {}
        self.silent: set[tuple[str, int]] = set()
        self.pumps: list[tuple[tuple[str, int], iosim.IOPump]] = []
        self.dials: list[tuple[str, int]] = []
        self.tls: list[Any] = []
        #: called on every flush round (e.g. ``StubTreq.flush`` of in-memory HTTP clients)
        self.flushers: list[Any] = []

    def listen(self, host: str, port: int, factory: Any) -> None:
        self.servers[(host, port)] = factory

    def connectSSL(
        self,
        host: str,
        port: int,
        factory: Any,
        contextFactory: Any,
        timeout: float = 30,
        bindAddress: Any = None,
    ) -> MemoryConnector:
        self.tls.append(contextFactory)
        connector = MemoryConnector(self, host, port, factory)
        connector.connect()
        return connector

    def open_connections(self, host: str, port: int) -> int:
        return sum(
            1
            for address, pump in self.pumps
            if address == (host, port) and not pump.clientIO.disconnected
        )

    def kill(self, host: str, port: int) -> None:
        """The agent crashes: it stops listening and every connection to it drops uncleanly."""
        self.servers.pop((host, port), None)
        for address, pump in self.pumps:
            if address == (host, port) and not pump.serverIO.disconnected:
                pump.serverIO.disconnectReason = error.ConnectionLost("agent killed")
                pump.clientIO.disconnectReason = error.ConnectionLost("agent killed")
                pump.serverIO.loseConnection()
        self.flush()

    def flush(self) -> None:
        """Run what is due now, complete connects and move bytes until nothing moves."""
        for _ in range(10000):
            self.advance(0)
            for flusher in self.flushers:
                flusher()
            moved = False
            for _address, pump in list(self.pumps):
                if pump.pump(advanceClock=False):
                    moved = True
            self.pumps = [
                (address, pump)
                for address, pump in self.pumps
                if not (pump.clientIO.disconnected and pump.serverIO.disconnected)
            ]
            if not moved and not any(call.getTime() <= self.seconds() for call in self.calls):
                return
        raise AssertionError("the memory network never went quiet")

    def run(self, seconds: float, step: float = 0.1) -> None:
        """Let ``seconds`` pass in ``step``s, flushing after each."""
        end = self.seconds() + seconds
        self.flush()
        while self.seconds() < end - 1e-9:
            self.advance(min(step, end - self.seconds()))
            self.flush()
