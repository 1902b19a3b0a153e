"""The reconnecting WebSocket factory: backoff and jitter, the handshake cap, timeouts, stop."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionRefusedError, UserError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lpa.relay.backoff import Backoff, HandshakeGate
from lpa.relay.interfaces import AgentAddress
from lpa.relay.ws_client import RelayWebSocketFactory, WebSocketDialer


class FakeConnector:
    def __init__(self, factory: Any, log: list) -> None:
        self.factory = factory
        self.log = log
        self.state = "disconnected"
        self.connects = 0

    def connect(self) -> None:
        self.connects += 1
        self.state = "connecting"
        self.log.append(self.factory.address.host)
        self.factory.startedConnecting(self)

    def stopConnecting(self) -> None:
        if self.state == "connecting":
            self.state = "disconnected"
            self.factory.clientConnectionFailed(self, Failure(UserError()))

    def fail(self) -> None:
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, Failure(ConnectionRefusedError("refused")))


class FakeReactor:
    def __init__(self) -> None:
        self.dialled: list[str] = []
        self.connectors: dict[str, FakeConnector] = {}
        self.tls: list[Any] = []

    def connectSSL(
        self, host: str, port: int, factory: Any, options: Any, timeout: float
    ) -> FakeConnector:
        connector = FakeConnector(factory, self.dialled)
        self.connectors[host] = connector
        self.tls.append(options)
        connector.connect()
        return connector


class Listener:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def ws_opened(self) -> None:
        self.calls.append(("opened",))

    def ws_message(self, message: dict) -> None:
        self.calls.append(("message", message))

    def ws_failed(self, reason: str, handshake: bool) -> None:
        self.calls.append(("failed", reason, handshake))


class FactoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reactor = FakeReactor()
        self.gate = HandshakeGate(1)
        self.listener = Listener()

    def factory(self, host: str = "agent1", tls: Any = "TLS") -> RelayWebSocketFactory:
        factory = RelayWebSocketFactory(
            AgentAddress(host, 12443),
            self.listener,
            reactor=self.reactor,
            clock=self.clock,
            tls_options=tls,
            gate=self.gate,
            backoff=Backoff(1, 4, jitter=lambda: 1.0),
            handshake_timeout=10,
        )
        self.addCleanup(factory.stop)
        return factory

    def test_never_without_tls(self) -> None:
        """A factory without TLS options cannot be built."""
        self.assertRaises(ValueError, self.factory, tls=None)

    def test_backoff_sequence_on_failures(self) -> None:
        """Each failed handshake is reported and redialled after the next jittered backoff delay."""
        factory = self.factory()
        factory.start()
        connector = self.reactor.connectors["agent1"]
        delays = []
        for _ in range(4):
            connector.fail()
            [call] = [
                c
                for c in self.clock.getDelayedCalls()
                if c.getTime() > self.clock.seconds() and c.func.__name__ == "redial"
            ]
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [1, 2, 4, 4])
        self.assertEqual(connector.connects, 5)
        self.assertEqual(self.listener.calls[0][0::2], ("failed", True))
        self.assertIn("refused", self.listener.calls[0][1])

    def test_handshake_cap(self) -> None:
        """With a cap of one, a second agent dials only once the first handshake is over."""
        first, second = self.factory("agent1"), self.factory("agent2")
        first.start()
        second.start()
        self.assertEqual(self.reactor.dialled, ["agent1"])
        self.assertEqual((self.gate.in_flight, self.gate.waiting), (1, 1))
        self.reactor.connectors["agent1"].fail()
        self.assertEqual(self.reactor.dialled, ["agent1", "agent2"])
        self.clock.advance(1)  # agent1's retry waits for the gate
        self.assertEqual(self.reactor.dialled, ["agent1", "agent2"])
        self.reactor.connectors["agent2"].fail()
        self.assertEqual(self.reactor.dialled, ["agent1", "agent2", "agent1"])

    def test_handshake_timeout(self) -> None:
        """A dial that hangs is abandoned after handshake_timeout and reported as a timeout."""
        factory = self.factory()
        factory.start()
        self.clock.advance(10)
        [(kind, reason, handshake)] = self.listener.calls
        self.assertEqual((kind, handshake), ("failed", True))
        self.assertIn("timed out after 10s", reason)
        self.assertEqual(self.gate.in_flight, 0)

    def test_stop(self) -> None:
        """stop() ends redialling, gives up a gate wait, and leaves no timer behind."""
        blocker = self.factory("agent0")
        blocker.start()
        factory = self.factory()
        factory.start()
        self.successResultOf(factory.stop())
        self.assertEqual(self.gate.waiting, 0)
        self.reactor.connectors["agent0"].fail()
        self.successResultOf(blocker.stop())
        self.assertEqual(self.reactor.dialled, ["agent0"])
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])
        self.assertEqual(factory.send_json({"action": "subscribe"}), False)

    def test_dialer_builds_tls_per_host(self) -> None:
        """The dialer asks for TLS options for the agent's host name and starts dialling."""
        hosts = []
        dialer = WebSocketDialer(
            reactor=self.reactor,
            clock=self.clock,
            tls_options_for=lambda host: hosts.append(host) or f"tls-for-{host}",
            gate=self.gate,
            make_backoff=lambda: Backoff(1, 2),
            handshake_timeout=5,
        )
        factory = dialer(AgentAddress("agent9.example", 443), self.listener)
        self.addCleanup(factory.stop)
        self.assertEqual(
            (hosts, self.reactor.tls), (["agent9.example"], ["tls-for-agent9.example"])
        )
        self.assertEqual(factory.url, "wss://agent9.example:443/api/v1/ws/jobs")
        self.assertEqual(factory.protocols, ["lpa.jobs.v1"])  # the job stream's subprotocol


class AlpnTests(SynchronousTestCase):
    def protocol(
        self, negotiated: str | None, subprotocol: str | None = "lpa.jobs.v1"
    ) -> tuple[Any, list]:
        from lpa.relay.ws_client import RelayWebSocketProtocol

        events: list = []

        class Factory:
            label = "agent1:12443"
            listener = Listener()

            def negotiated_protocol(self, transport: Any) -> str | None:
                return negotiated

            def handshake_succeeded(self, proto: Any) -> None:
                events.append("succeeded")

        proto = RelayWebSocketProtocol()
        proto.factory = Factory()
        proto.transport = object()
        proto.websocket_protocol_in_use = subprotocol
        proto.dropConnection = lambda abort=False: events.append(("drop", abort))  # type: ignore[method-assign]
        return proto, events

    def test_h2_is_a_handshake_failure(self) -> None:
        """A connection that negotiated anything but http/1.1 is dropped and never reported open."""
        for negotiated in ("h2", None):
            proto, events = self.protocol(negotiated)
            proto.onOpen()
            self.assertEqual((events, proto.opened), ([("drop", True)], False))
            self.assertIn(repr(negotiated), proto.describe_failure())

    def test_subprotocol_not_selected_is_a_handshake_failure(self) -> None:
        """An agent that did not select lpa.jobs.v1 is dropped and never reported open."""
        proto, events = self.protocol("http/1.1", subprotocol=None)
        proto.onOpen()
        self.assertEqual((events, proto.opened), ([("drop", True)], False))
        self.assertIn("lpa.jobs.v1", proto.describe_failure())

    def test_http11_opens(self) -> None:
        """http/1.1 negotiated: the factory hears the handshake succeeded."""
        proto, events = self.protocol("http/1.1")
        proto.onOpen()
        self.assertEqual((events, proto.opened), (["succeeded"], True))
