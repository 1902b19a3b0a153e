"""Tools for the end-to-end fault tests (``tests/system/test_faults.py``).

* :class:`BlackholeProxy` — a TCP proxy in the test process between the relay and one agent
  (the host row's ``agent_port`` points at it).  :meth:`~BlackholeProxy.blackhole` makes it
  swallow every byte in both directions without closing anything, as a dropped route does: a
  close on one side does not reach the other, new connections are accepted and go nowhere.
  :meth:`~BlackholeProxy.restore` ends it: connections that lived through the blackhole are
  reset (their bytes are lost, as TCP would give up on them), new ones are forwarded again.
* :class:`AsyncListener` — a LISTEN session on ``job_update`` polled from the reactor (the test
  process also runs proxies, so it must never block), which can reconnect after a PostgreSQL
  restart.
* :func:`mutating_start` — when the stand-in package run of an agent started.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall

from tests import standin


def _io(side: Protocol) -> Any:
    """A connected side's TCP transport (write, loseConnection, abortConnection)."""
    return side.transport


class _Pair:
    """One proxied connection: the accepted side and the side connected to the agent."""

    def __init__(self, proxy: BlackholeProxy, poisoned: bool) -> None:
        self.proxy = proxy
        self.poisoned = poisoned  # lived through a blackhole: bytes are dropped until reset
        self.front: _Front | None = None
        self.back: _Back | None = None
        self.buffered: list[bytes] = []  # client bytes before the agent side connected
        self.closed = False

    def from_front(self, data: bytes) -> None:
        if self.poisoned:
            return
        if self.back is None:
            self.buffered.append(data)
        else:
            _io(self.back).write(data)

    def from_back(self, data: bytes) -> None:
        if not self.poisoned and self.front is not None:
            _io(self.front).write(data)

    def back_connected(self, back: _Back) -> None:
        self.back = back
        if self.closed or self.poisoned:
            _io(back).abortConnection()
            return
        for data in self.buffered:
            _io(back).write(data)
        self.buffered = []

    def lost(self, side: _Front | _Back) -> None:
        """One side closed: pass the close on, unless a blackhole swallows it."""
        side.gone = True
        if self.poisoned:
            return
        self.closed = True
        self.proxy.pairs.discard(self)
        other = self.back if side is self.front else self.front
        if other is not None and not other.gone:
            _io(other).loseConnection()

    def reset(self) -> None:
        self.closed = True
        self.proxy.pairs.discard(self)
        for side in (self.front, self.back):
            if side is not None and not side.gone:
                _io(side).abortConnection()


class _Front(Protocol):
    gone = False

    def __init__(self, proxy: BlackholeProxy) -> None:
        self.proxy = proxy
        self.pair: _Pair | None = None

    def connectionMade(self) -> None:
        pair = _Pair(self.proxy, poisoned=self.proxy.holed)
        pair.front = self
        self.pair = pair
        self.proxy.pairs.add(pair)
        self.proxy.accepted += 1
        if pair.poisoned:
            return  # a SYN into a dropped route: nothing reaches the agent
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.target_port, timeout=5)
        connecting = connectProtocol(endpoint, _Back(pair))

        def failed(_: Any) -> None:
            if self.transport is not None:
                self.transport.loseConnection()

        connecting.addErrback(failed)

    def dataReceived(self, data: bytes) -> None:
        assert self.pair is not None
        self.pair.from_front(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.pair is not None:
            self.pair.lost(self)


class _Back(Protocol):
    gone = False

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def connectionMade(self) -> None:
        self.pair.back_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.pair.from_back(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.pair.lost(self)


class BlackholeProxy:
    """A loopback TCP proxy to ``127.0.0.1:target_port`` that can drop everything for a while."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pairs: set[_Pair] = set()
        self.holed = False
        self.accepted = 0
        self.port: Any = None

    async def listen(self) -> int:
        """Start listening on a free loopback port; return it."""
        factory = Factory.forProtocol(lambda: _Front(self))
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        return int(self.port.getHost().port)

    def blackhole(self) -> None:
        """From now on every byte is dropped, both ways; nothing is closed."""
        self.holed = True
        for pair in self.pairs:
            pair.poisoned = True

    def restore(self) -> None:
        """End the blackhole: reset the connections that lived through it, forward new ones."""
        self.holed = False
        for pair in list(self.pairs):
            if pair.poisoned:
                pair.reset()

    async def close(self) -> None:
        for pair in list(self.pairs):
            pair.reset()
        if self.port is not None:
            await self.port.stopListening()


class AsyncListener:
    """LISTEN ``job_update`` in a plain psycopg2 session, drained every 50 ms on the reactor."""

    def __init__(self, dsn: str, channel: str = "job_update") -> None:
        self.dsn = dsn
        self.channel = channel
        self.received: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.connection: Any = None
        self.lost = 0
        self._loop = LoopingCall(self._drain)
        self.connect()
        self._loop.start(0.05, now=False)

    def connect(self) -> None:
        """(Re)connect and LISTEN; notifications sent while disconnected are not seen."""
        self.connection = psycopg2.connect(self.dsn)
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            cursor.execute(f"LISTEN {self.channel}")

    @property
    def connected(self) -> bool:
        return self.connection is not None and not self.connection.closed

    def _drain(self) -> None:
        if not self.connected:
            return
        try:
            self.connection.poll()
        except psycopg2.Error:
            self.lost += 1
            self.connection.close()
            return
        while self.connection.notifies:
            note = self.connection.notifies.pop(0)
            self.raw.append(note.payload)
            self.received.append(json.loads(note.payload))

    def close(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self.connection is not None:
            self.connection.close()


def mutating_start(agent: Any) -> float | None:
    """``time.time()`` at which the agent's stand-in package run started, or None yet."""
    for entry in agent.record():
        if entry.get("event") != "start" or entry.get("command") != "apt-get":
            continue
        if standin.mutating_calls([entry]):
            return float(entry["time"])
    return None

