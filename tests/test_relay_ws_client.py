"""The per-agent WebSocket: ReconnectingClientFactory redials, the handshake cap, timeouts,
subprotocol and ALPN checks, failure reasons, stop; real Autobahn protocols over iosim."""

from __future__ import annotations

import itertools
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from service_identity import VerificationError
from service_identity.exceptions import DNSMismatch
from service_identity.hazmat import DNS_ID
from twisted.internet import error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from txaio.testutil import replace_loop
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lpa.protocol import SUBPROTOCOL
from lpa.relay.backoff import HandshakeGate
from lpa.relay.interfaces import AgentAddress
from lpa.relay.machine import AgentLink
from lpa.relay.reasons import describe_transport_failure
from lpa.relay.ws_client import AgentWebSocket, IAgentWebSocket, IWebSocketListener, WebSocketDialer
from lpa.relay.ws_dialler import AgentDialler
from lpa.relay.ws_protocol import RelayWebSocketProtocol
from tests.memnet import MemoryNetwork

ONE = AgentAddress("agent1.example", 12443)
TWO = AgentAddress("agent2.example", 12443)


@implementer(IWebSocketListener)
class Listener:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def ws_opened(self) -> None:
        self.calls.append(("opened",))

    def ws_message(self, message: dict[str, Any]) -> None:
        self.calls.append(("message", message))

    def ws_failed(self, reason: str, handshake: bool) -> None:
        self.calls.append(("failed", reason, handshake))


class EchoAgent(WebSocketServerProtocol):
    """Selects lpa.jobs.v1 when the factory says so and echoes each frame back."""

    factory: EchoAgentFactory

    def onConnect(self, request: Any) -> str | None:
        self.factory.offered.append(list(request.protocols))
        return SUBPROTOCOL if self.factory.select else None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append(payload)
        self.sendMessage(payload, isBinary)


class EchoAgentFactory(WebSocketServerFactory):
    """Makes :class:`EchoAgent`s; records the subprotocols offered and the frames received."""

    protocol = EchoAgent  # type: ignore[assignment]  # its `factory` is narrower than the stub

    def __init__(self, select: bool) -> None:
        super().__init__()
        self.select = select
        self.offered: list[list[str]] = []
        self.received: list[bytes] = []


def agent_factory(select: bool = True) -> EchoAgentFactory:
    return EchoAgentFactory(select)


class NotFound(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(404)
        return b'{"success": false}'


class WebSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.network = MemoryNetwork()
        loop = replace_loop(self.network)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        self.gate = HandshakeGate(1)
        self.listener = Listener()
        self.sockets: list[AgentWebSocket] = []
        self.addCleanup(self.no_delayed_calls_left)

    def no_delayed_calls_left(self) -> None:
        stopping = [websocket.stop(close_timeout=1) for websocket in self.sockets]
        self.network.run(2)
        for stopped in stopping:
            self.successResultOf(stopped)
        self.assertEqual(self.network.getDelayedCalls(), [])

    def websocket(
        self, address: AgentAddress = ONE, negotiated: str | None = "http/1.1", **kw: Any
    ) -> AgentWebSocket:
        settings: dict[str, Any] = {
            "reactor": self.network,
            "clock": self.network,
            "tls_options": "TLS",
            "gate": self.gate,
            "handshake_timeout": 10,
            "initial_delay": 1,
            "max_delay": 4,
            "jitter": 0,
            "negotiated_protocol": lambda transport: negotiated,
        }
        settings.update(kw)
        websocket = AgentWebSocket(address, self.listener, **settings)
        self.sockets.append(websocket)
        return websocket

    def failures(self) -> list[tuple[str, bool]]:
        return [(c[1], c[2]) for c in self.listener.calls if c[0] == "failed"]

    def test_interfaces(self) -> None:
        """The real classes provide what the link relies on; so do the test doubles here."""
        verifyObject(IAgentWebSocket, self.websocket())
        verifyObject(IWebSocketListener, self.listener)
        nothing: Any = None
        link = AgentLink(ONE, store=nothing, clock=self.network, dial=nothing, make_poller=nothing)
        verifyObject(IWebSocketListener, link)

    def test_dialler_is_a_reconnecting_client_factory_on_our_clock(self) -> None:
        """The redial policy is ReconnectingClientFactory's, set through its documented knobs."""
        dialler = self.websocket().dialler
        self.assertIsInstance(dialler, AgentDialler)
        self.assertEqual(
            (dialler.clock, dialler.initialDelay, dialler.maxDelay, dialler.factor, dialler.jitter),
            (self.network, 1, 4, 2.0, 0),
        )

    def test_opens_with_the_subprotocol_and_carries_frames(self) -> None:
        """lpa.jobs.v1 offered and selected: open, a JSON frame each way."""
        agent = agent_factory()
        self.network.listen(ONE.host, ONE.port, agent)
        websocket = self.websocket()
        websocket.start()
        self.network.flush()
        self.assertEqual(self.listener.calls, [("opened",)])
        self.assertEqual(agent.offered, [[SUBPROTOCOL]])
        self.assertTrue(websocket.send_json({"action": "subscribe", "job_id": "j"}))
        self.network.flush()
        self.assertEqual(
            self.listener.calls[-1], ("message", {"action": "subscribe", "job_id": "j"})
        )
        self.assertEqual(self.gate.in_flight, 0)
        self.assertEqual(websocket.url, "wss://agent1.example:12443/api/v1/ws/jobs")

    def test_agent_without_the_subprotocol_is_a_handshake_failure(self) -> None:
        """An agent that does not select lpa.jobs.v1 fails the handshake, saying so first."""
        self.network.listen(ONE.host, ONE.port, agent_factory(select=False))
        self.websocket().start()
        self.network.flush()
        [(reason, handshake)] = self.failures()
        self.assertTrue(handshake)
        self.assertTrue(
            reason.startswith(f"the agent did not accept WebSocket subprotocol {SUBPROTOCOL}")
        )
        self.assertNotIn("peer dropped", reason)

    def test_alpn_h2_is_reported_as_such(self) -> None:
        """A connection that negotiated h2 fails the handshake with that reason, not a lost one."""
        self.network.listen(ONE.host, ONE.port, agent_factory())
        self.websocket(negotiated="h2").start()
        self.network.flush()
        [(reason, handshake)] = self.failures()
        self.assertTrue(handshake)
        self.assertTrue(reason.startswith("the agent chose HTTP/2 (ALPN h2)"), reason)
        self.assertNotIn("ConnectionLost", reason)

    def test_http_error_status_is_a_handshake_failure(self) -> None:
        """A 404 on the WebSocket path (WebSocket disabled on the agent) names the status."""
        site = Site(NotFound(), reactor=self.network, timeout=None)
        self.network.listen(ONE.host, ONE.port, site)
        self.websocket().start()
        self.network.flush()
        [(reason, handshake)] = self.failures()
        self.assertTrue(handshake)
        self.assertIn("404", reason)

    def test_refused_redials_with_the_factory_backoff(self) -> None:
        """Refused dials are reported and redialled after 1, 2, 4, 4 s (factor 2, cap 4)."""
        self.websocket().start()
        self.network.flush()
        dial_times = [self.network.seconds()]
        for _ in range(4):
            before = len(self.network.dials)
            while len(self.network.dials) == before:
                self.network.advance(0.5)
                self.network.flush()
            dial_times.append(self.network.seconds())
        gaps = [b - a for a, b in itertools.pairwise(dial_times)]
        self.assertEqual(gaps, [1, 2, 4, 4])
        self.assertEqual(
            self.failures()[0], ("connection refused: nothing listens on the agent's port", True)
        )

    def test_handshake_cap(self) -> None:
        """With a cap of one, a second agent dials only once the first handshake is over."""
        self.network.silent.add((ONE.host, ONE.port))
        self.network.listen(TWO.host, TWO.port, agent_factory())
        self.websocket(ONE).start()
        self.websocket(TWO).start()
        self.network.flush()
        self.assertEqual(self.network.dials, [(ONE.host, ONE.port)])
        self.assertEqual((self.gate.in_flight, self.gate.waiting), (1, 1))
        self.network.advance(10)  # the first handshake times out
        self.network.flush()
        self.assertEqual(self.network.dials, [(ONE.host, ONE.port), (TWO.host, TWO.port)])
        self.assertIn(("opened",), self.listener.calls)

    def test_handshake_timeout(self) -> None:
        """A dial nobody answers is abandoned after handshake_timeout and reported as a timeout."""
        self.network.silent.add((ONE.host, ONE.port))
        self.websocket().start()
        self.network.advance(10)
        [(reason, handshake)] = self.failures()
        self.assertEqual((reason, handshake), ("connection timed out after 10s", True))
        self.assertEqual(self.gate.in_flight, 0)

    def test_drop_after_open_redials(self) -> None:
        """An open socket that drops is reported as dropped; the dialler redials after 1 s."""
        self.network.listen(ONE.host, ONE.port, agent_factory())
        self.websocket().start()
        self.network.flush()
        factory = self.network.servers[(ONE.host, ONE.port)]
        self.network.kill(ONE.host, ONE.port)
        [(_reason, handshake)] = self.failures()
        self.assertFalse(handshake)
        self.network.listen(ONE.host, ONE.port, factory)
        self.network.run(1.5)
        self.assertEqual(self.listener.calls.count(("opened",)), 2)

    def test_stop_while_waiting_for_the_gate(self) -> None:
        """stop() gives up a gate wait; the agent is never dialled; no timer is left."""
        self.network.silent.add((ONE.host, ONE.port))
        blocker = self.websocket(ONE)
        blocker.start()
        waiting = self.websocket(TWO)
        waiting.start()
        self.successResultOf(waiting.stop())
        self.assertEqual(self.gate.waiting, 0)
        self.successResultOf(blocker.stop())
        self.assertEqual(self.network.dials, [(ONE.host, ONE.port)])
        self.assertEqual(self.gate.in_flight, 0)
        self.assertFalse(waiting.send_json({"action": "subscribe"}))
        self.assertEqual(self.failures(), [])

    def test_stop_when_open_sends_a_close_frame(self) -> None:
        """stop() on an open socket closes it with 1000 and fires once it is gone; no redial."""
        agent = agent_factory()
        self.network.listen(ONE.host, ONE.port, agent)
        websocket = self.websocket()
        websocket.start()
        self.network.flush()
        stopping = websocket.stop()
        self.network.flush()
        self.successResultOf(stopping)
        self.network.run(10)
        self.assertEqual(len(self.network.dials), 1)
        self.assertEqual(self.failures(), [])

    def test_dialer_builds_tls_per_host(self) -> None:
        """The dialer asks for TLS options for the agent's host name and starts dialling."""
        hosts: list[str] = []

        def tls_options_for(host: str) -> str:
            hosts.append(host)
            return f"tls-for-{host}"

        dialer = WebSocketDialer(
            reactor=self.network,
            clock=self.network,
            tls_options_for=tls_options_for,
            gate=self.gate,
            handshake_timeout=5,
            initial_delay=1,
            max_delay=2,
        )
        websocket = dialer(AgentAddress("agent9.example", 443), self.listener)
        self.sockets.append(websocket)
        self.assertEqual(
            (hosts, self.network.tls), (["agent9.example"], ["tls-for-agent9.example"])
        )

    def test_never_without_tls(self) -> None:
        """A WebSocket without TLS options cannot be built."""
        self.assertRaises(ValueError, self.websocket, tls_options=None)


class ReasonTests(SynchronousTestCase):
    def test_host_name_mismatch_leads(self) -> None:
        """A service_identity mismatch reads as the certificate not valid for the dialled name."""
        mismatch = DNSMismatch(mismatched_id=DNS_ID("wrong.example"))
        failure = Failure(VerificationError(errors=[mismatch]))
        reason = describe_transport_failure(failure)
        assert reason is not None
        self.assertTrue(
            reason.startswith("TLS: the agent's certificate is not valid for 'wrong.example'")
        )

    def test_openssl_alert_gets_a_hint(self) -> None:
        """An OpenSSL alert list becomes its text plus what it means for the operator."""
        from OpenSSL import SSL

        failure = Failure(SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")]))
        self.assertEqual(
            describe_transport_failure(failure),
            "TLS handshake failed: tlsv13 alert certificate required "
            "(the agent wants the relay's client certificate)",
        )

    def test_generic_endings_say_nothing(self) -> None:
        """A clean close, a bare lost or aborted connection, or our own stop add no reason."""
        for value in (error.ConnectionDone(), error.ConnectionLost(), error.ConnectionAborted(),
                      error.UserError()):
            self.assertIsNone(describe_transport_failure(Failure(value)))

    def test_our_reason_first_autobahn_text_last(self) -> None:
        """The protocol's reason: ours if we ended it, else the transport's; Autobahn's last."""
        proto = RelayWebSocketProtocol()
        proto.wasNotCleanReason = (
            "peer dropped the TCP connection without previous WebSocket closing handshake"
        )
        proto.lost_reason = Failure(error.ConnectionLost())
        self.assertEqual(proto.describe_failure(), proto.wasNotCleanReason)
        proto.lost_reason = Failure(error.ConnectionRefusedError())
        self.assertEqual(
            proto.describe_failure(), "connection refused: nothing listens on the agent's port"
        )
        proto.fail_reason = "opening handshake timed out after 5s"
        self.assertEqual(proto.describe_failure(), "opening handshake timed out after 5s")
