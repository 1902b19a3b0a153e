"""Tests for lpa.agent.ws: the Autobahn protocol and factory, over iosim with a task.Clock.

Real Autobahn client protocols talk to the real server protocol through ``twisted.test.iosim``;
Autobahn's own timers (auto-ping, handshake timeouts) run on the injected clock on the server
and, through ``txaio.testutil.replace_loop``, on the client.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import autobahn.websocket
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop
from zope.interface.verify import verifyObject

from lpa.agent.eventlog import EventLog
from lpa.agent.interfaces import IStreamChannel
from lpa.agent.ws import JobStreamFactory, JobStreamProtocol, make_ws_resource
from lpa.events import RUNNING
from lpa.protocol import SUBPROTOCOL
from tests.fakes_jobs import FakeJobManager, new_job

P = TypeVar("P")

SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 8443)
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)

UPGRADE_REQUEST = (
    b"GET /api/v1/ws/jobs HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


def http_answer(raw: bytes) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Status line, headers (lower-cased names) and JSON body of a raw HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, json.loads(body)


class RecordingClient(WebSocketClientProtocol):
    """Keeps parsed messages and how the connection ended."""

    answer_pings = True

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []
        self.pongs: list[bytes] = []
        self.opened = False
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(json.loads(payload))

    def onPing(self, payload: bytes) -> None:
        if self.answer_pings:
            self.sendPong(payload)

    def onPong(self, payload: bytes) -> None:
        self.pongs.append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)

    def take(self) -> list[dict[str, Any]]:
        messages, self.messages = self.messages, []
        return messages

    def ending(self) -> tuple[bool, int | None, str | None]:
        """How the connection was closed (it must have been)."""
        assert self.closed is not None, "the connection is still open"
        return self.closed

    def send_json(self, message: Any) -> None:
        self.sendMessage(json.dumps(message).encode(), isBinary=False)


class SilentClient(RecordingClient):
    """Never answers the server's pings."""

    answer_pings = False


class RawClient(Protocol):
    """Bytes only, for handshakes Autobahn's client would not send."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def fake_transport(protocol: Any) -> iosim.FakeTransport:
    """The in-memory transport iosim gave ``protocol``."""
    transport = protocol.transport
    assert isinstance(transport, iosim.FakeTransport), transport
    return transport


def producer_of(protocol: Any) -> Any:
    """The producer registered with ``protocol``'s in-memory transport."""
    producer = fake_transport(protocol).producer
    assert producer is not None, "no producer registered"
    return producer


def build(factory: Any, cls: type[P], address: IPv4Address) -> P:
    """``factory.buildProtocol(address)``, which the test knows makes a ``cls``."""
    protocol = factory.buildProtocol(address)
    assert isinstance(protocol, cls), protocol
    return protocol


class ProtocolTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        loop = replace_loop(self.clock)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        self.events = EventLog(self.clock, max_events_per_job=50)
        self.jobs = FakeJobManager(self.clock, events=self.events)
        self.factory = self.make_factory()

    def make_factory(self, **kw: Any) -> JobStreamFactory:
        return JobStreamFactory(self.events, self.jobs, clock=self.clock, **kw)

    def connect(
        self,
        client_class: type[RecordingClient] = RecordingClient,
        factory: Any = None,
        protocols: list[str] | None = None,
        subscribe_all: bool = False,
        server: JobStreamProtocol | None = None,
    ) -> tuple[RecordingClient, JobStreamProtocol, iosim.IOPump]:
        if server is None:
            server = build(factory or self.factory, JobStreamProtocol, CLIENT_ADDRESS)
        client_factory = WebSocketClientFactory(
            "ws://127.0.0.1:8443/api/v1/ws/jobs",
            protocols=[SUBPROTOCOL] if protocols is None else protocols,
        )
        client_factory.protocol = client_class
        client_factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=0)
        client = build(client_factory, client_class, SERVER_ADDRESS)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True, peerAddress=CLIENT_ADDRESS),
            client,
            iosim.FakeTransport(client, isServer=False, peerAddress=SERVER_ADDRESS),
            clock=self.clock,
        )
        self.addCleanup(self.disconnect, client, pump)
        if subscribe_all:
            client.send_json({"action": "subscribe"})
            pump.flush()
        return client, server, pump

    def raw_connect(
        self, factory: Any = None
    ) -> tuple[RawClient, JobStreamProtocol, iosim.IOPump]:
        server = build(factory or self.factory, JobStreamProtocol, CLIENT_ADDRESS)
        raw = RawClient()
        pump = iosim.connect(
            server, iosim.FakeTransport(server, isServer=True),
            raw, iosim.FakeTransport(raw, isServer=False), clock=self.clock,
        )
        return raw, server, pump

    def disconnect(self, client: RecordingClient, pump: iosim.IOPump) -> None:
        if client.closed is None and client.opened:
            client.sendClose(1000)
            pump.flush()
            self.clock.advance(10)
            pump.flush()

    def assert_no_timers(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FactoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        self.events = EventLog(clock)
        self.jobs = FakeJobManager(clock, events=self.events)

    def test_options_set_explicitly(self) -> None:
        """Size limits, heartbeat, handshake timeouts, connection cap and no deflate are set."""
        factory = JobStreamFactory(
            self.events, self.jobs, clock=Clock(), max_message_bytes=1000, max_connections=3
        )
        self.assertEqual(
            (
                factory.maxFramePayloadSize,
                factory.maxMessagePayloadSize,
                factory.autoPingInterval,
                factory.autoPingTimeout,
                factory.maxConnections,
                factory.failByDrop,
                factory.webStatus,
            ),
            (1000, 1000, 5.0, 5.0, 3, False, False),
        )
        self.assertGreater(factory.openHandshakeTimeout, 0)
        self.assertGreater(factory.closeHandshakeTimeout, 0)
        self.assertIsNone(factory.perMessageCompressionAccept([object()]))

    def test_protocol_provides_its_interfaces(self) -> None:
        """The protocol is the session's channel and the transport's push producer."""
        factory = JobStreamFactory(self.events, self.jobs, clock=Clock())
        protocol = factory.buildProtocol(CLIENT_ADDRESS)
        self.assertTrue(verifyObject(IStreamChannel, protocol))
        self.assertTrue(verifyObject(IPushProducer, protocol))

    def test_bad_limits_rejected(self) -> None:
        """A ping timeout not above the interval, or a zero limit, is refused at construction."""
        self.assertRaises(ValueError, JobStreamFactory, self.events, self.jobs, ping_timeout=5.0)
        self.assertRaises(ValueError, JobStreamFactory, self.events, self.jobs, max_connections=0)

    def test_nvx_confirmed(self) -> None:
        """Autobahn's NVX accelerations are present, and the factory says so in its log."""
        self.assertTrue(autobahn.websocket.USES_NVX)
        with capturedLogs() as seen:
            JobStreamFactory(self.events, self.jobs, clock=Clock())
        nvx = [e for e in seen if "nvx" in e]
        self.assertEqual([(e["nvx"], e["log_level"]) for e in nvx], [("on", LogLevel.info)])

    def test_make_ws_resource(self) -> None:
        """make_ws_resource wraps the factory in Autobahn's WebSocketResource."""
        factory = JobStreamFactory(self.events, self.jobs, clock=Clock())
        resource = make_ws_resource(factory)
        self.assertIsInstance(resource, WebSocketResource)
        self.assertIs(resource._factory, factory)


class StreamTests(ProtocolTestBase):
    def test_handshake_and_greeting(self) -> None:
        """The RFC 6455 handshake completes and the client is greeted with ``connected``."""
        client, server, _pump = self.connect()
        self.assertTrue(client.opened)
        [greeting] = client.take()
        self.assertEqual(greeting["event"], "connected")
        self.assertIs(fake_transport(server).producer, server)
        self.assertEqual(
            (client.websocket_protocol_in_use, server.websocket_protocol_in_use),
            (SUBPROTOCOL, SUBPROTOCOL),
        )

    def test_subprotocol_selected_among_others(self) -> None:
        """A client offering several subprotocols, lpa.jobs.v1 among them, gets lpa.jobs.v1."""
        client, _server, _pump = self.connect(protocols=["lpa.jobs.v0", SUBPROTOCOL])
        self.assertTrue(client.opened)
        self.assertEqual(client.websocket_protocol_in_use, SUBPROTOCOL)

    def test_no_subprotocol_refused_with_envelope(self) -> None:
        """A handshake without lpa.jobs.v1 (the manager's relay) gets HTTP 400 and the JSON
        envelope naming the subprotocol; the server closes the connection, no session starts."""
        raw, server, pump = self.raw_connect()
        fake_transport(raw).write(UPGRADE_REQUEST + b"\r\n")
        pump.flush()
        status, headers, body = http_answer(raw.received)
        self.assertEqual(status, "HTTP/1.1 400 Bad Request")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(int(headers["content-length"]), len(raw.received.split(b"\r\n\r\n")[1]))
        self.assertEqual(set(body), {"success", "request_id", "timestamp", "data", "error"})
        self.assertEqual((body["success"], body["data"]), (False, None))
        error = body["error"]
        self.assertEqual((error["code"], error["retryable"]), ("SUBPROTOCOL_REQUIRED", False))
        self.assertIn(SUBPROTOCOL, error["message"])
        self.assertEqual(error["details"], {"subprotocol": SUBPROTOCOL, "offered": []})
        self.assertTrue(fake_transport(server).disconnected)
        self.assertIsNone(server.session)
        self.assertEqual((self.events.subscriber_count(), self.factory.countConnections), (0, 0))
        self.clock.advance(60)
        self.assert_no_timers()

    def test_other_subprotocol_refused(self) -> None:
        """Offering only other subprotocols is refused the same way; the offer is echoed."""
        raw, _server, pump = self.raw_connect()
        fake_transport(raw).write(UPGRADE_REQUEST + b"Sec-WebSocket-Protocol: graphql-ws\r\n\r\n")
        pump.flush()
        status, _, body = http_answer(raw.received)
        self.assertTrue(status.startswith("HTTP/1.1 400"))
        self.assertEqual(body["error"]["details"]["offered"], ["graphql-ws"])

    def test_autobahn_client_without_subprotocol_fails_handshake(self) -> None:
        """A WebSocket client offering no subprotocol never opens: its handshake fails, which
        is what sends the manager's relay to polling."""
        client, _server, _pump = self.connect(protocols=[])
        self.assertFalse(client.opened)
        self.assertIsNotNone(client.closed)
        self.assertFalse(client.ending()[0])
        self.assertEqual(self.events.subscriber_count(), 0)

    def test_refused_client_that_stays_is_aborted(self) -> None:
        """A refused client that keeps its end open (e.g. never answers TLS close_notify) is
        aborted after the closing-handshake timeout: a refusal holds no socket."""
        server = build(self.factory, JobStreamProtocol, CLIENT_ADDRESS)
        transport = StringTransport()
        transport.registerProducer(RawClient(), True)  # the HTTP channel, as in the agent
        server.makeConnection(transport)
        server.dataReceived(UPGRADE_REQUEST + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400"))
        self.assertTrue(transport.disconnecting)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        server.connectionLost(Failure(ConnectionDone()))
        self.assert_no_timers()

    def test_refusal_logs_one_info_line(self) -> None:
        """A refused handshake is one info line naming the subprotocol, no warning."""
        with capturedLogs() as seen:
            raw, _server, pump = self.raw_connect()
            fake_transport(raw).write(UPGRADE_REQUEST + b"\r\n")
            pump.flush()
        levels = [e["log_level"] for e in seen if e.get("log_level") >= LogLevel.info]
        self.assertEqual(levels, [LogLevel.info])
        [line] = [e for e in seen if e.get("log_level") == LogLevel.info]
        self.assertEqual(line["subprotocol"], SUBPROTOCOL)

    def test_subscribe_replay_and_live(self) -> None:
        """subscribe with after_seq replays then streams live events through job_complete."""
        job = new_job(self.jobs)
        self.jobs.step(job, RUNNING, 10, "started")
        client, _server, pump = self.connect()
        client.send_json({"action": "subscribe", "job_id": job, "after_seq": 0})
        pump.flush()
        self.jobs.step(job, RUNNING, 50, "half")
        self.jobs.finish(job)
        pump.flush()
        frames = [m for m in client.take() if "seq" in m]
        self.assertEqual([(m["seq"], m["event"]) for m in frames],
                         [(1, "job_status"), (2, "job_status"), (3, "job_status"),
                          (4, "job_status"), (5, "job_complete")])
        self.assertEqual(frames, [e.to_wire() for e in self.events.kept(job)])

    def test_garbage_then_still_working(self) -> None:
        """Garbage text gets an error event and the same connection keeps working."""
        client, _server, pump = self.connect(subscribe_all=True)
        client.take()
        client.sendMessage(b"\x00garbage{", isBinary=False)
        pump.flush()
        [error] = client.take()
        self.assertEqual(error["error_code"], "INVALID_JSON")
        job = new_job(self.jobs)
        pump.flush()
        self.assertEqual([m["job_id"] for m in client.take()], [job])
        self.assertIsNone(client.closed)

    def test_binary_frame_gets_error_event(self) -> None:
        """A binary frame gets a BINARY_NOT_SUPPORTED error event; the connection stays open."""
        client, _server, pump = self.connect()
        client.take()
        client.sendMessage(b"\x01\x02", isBinary=True)
        pump.flush()
        [error] = client.take()
        self.assertEqual(error["error_code"], "BINARY_NOT_SUPPORTED")
        self.assertIsNone(client.closed)

    def test_invalid_utf8_closes_1007(self) -> None:
        """A text message with invalid UTF-8 is closed with 1007; others keep being served."""
        bystander, _, bystander_pump = self.connect(subscribe_all=True)
        client, _server, pump = self.connect()
        client.sendMessage(b'{"action":"\xff\xfe"}', isBinary=False)
        pump.flush()
        self.assertEqual(client.ending()[1], 1007)
        new_job(self.jobs)
        bystander_pump.flush()
        self.assertEqual(
            [m["event"] for m in bystander.take()], ["connected", "subscribed", "job_status"]
        )

    def test_oversized_message_closes_1009(self) -> None:
        """A message over max_message_bytes is closed with 1009."""
        factory = self.make_factory(max_message_bytes=1024)
        client, _server, pump = self.connect(factory=factory)
        client.send_json({"action": "subscribe", "pad": "x" * 900})
        pump.flush()
        self.assertEqual(client.take()[-1]["event"], "subscribed")  # under the limit: served
        client.send_json({"action": "subscribe", "pad": "x" * 1100})
        pump.flush()
        self.assertEqual(client.ending()[1], 1009)

    def test_slow_consumer_closed_1008(self) -> None:
        """Past send_buffer_events while the transport is full, the server closes with 1008."""
        factory = self.make_factory(send_buffer_events=5)
        client, server, pump = self.connect(factory=factory, subscribe_all=True)
        client.take()
        producer_of(server).pauseProducing()  # what a full transport buffer does
        job = new_job(self.jobs)
        for i in range(5):
            self.jobs.step(job, RUNNING, i, "step")
        self.assertEqual(self.events.last_seq(job), 6)  # the engine was never held back
        producer_of(server).resumeProducing()
        pump.flush()
        self.assertEqual(client.take(), [])
        _was_clean, code, reason = client.ending()
        self.assertEqual(code, 1008)
        self.assertIn("slow consumer", reason)
        self.assertEqual(self.events.subscriber_count(), 0)

    def test_slow_consumer_close_outlasts_autobahn_timers(self) -> None:
        """After a 1008 close the client may read late: neither the closing-handshake timeout
        (5 s) nor the auto-ping timeout (10 s) aborts it; the close arrives, clean, with code
        and reason."""
        factory = self.make_factory(send_buffer_events=2)
        client, server, pump = self.connect(factory=factory, subscribe_all=True)
        producer_of(server).pauseProducing()
        job = new_job(self.jobs)
        for i in range(3):
            self.jobs.step(job, RUNNING, i, "step")
        self.assertEqual(server.state, server.STATE_CLOSING)
        self.clock.advance(25)  # the client reads nothing meanwhile
        self.assertFalse(fake_transport(server).disconnecting)
        pump.flush()
        self.assertEqual(client.ending()[:2], (True, 1008))
        self.assertIn("slow consumer", client.ending()[2])
        self.clock.advance(60)
        self.assert_no_timers()

    def test_slow_consumer_that_never_reads_is_aborted(self) -> None:
        """A client closed with 1008 that never reads is aborted after drain_timeout."""
        factory = self.make_factory(send_buffer_events=2, drain_timeout=30)
        _client, server, pump = self.connect(factory=factory, subscribe_all=True)
        producer_of(server).pauseProducing()
        job = new_job(self.jobs)
        for i in range(3):
            self.jobs.step(job, RUNNING, i, "step")
        self.clock.advance(29.9)
        self.assertFalse(fake_transport(server).disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(fake_transport(server).disconnecting)
        pump.flush()
        self.assertEqual(self.events.subscriber_count(), 0)
        self.clock.advance(60)
        self.assert_no_timers()

    def test_peer_gone_during_close_leaves_no_timer(self) -> None:
        """A peer that vanishes while the server waits for its close reply leaves no timer."""
        factory = self.make_factory(send_buffer_events=1)
        client, server, pump = self.connect(factory=factory, subscribe_all=True)
        producer_of(server).pauseProducing()
        new_job(self.jobs)
        new_job(self.jobs)  # overflow: the server sends its close frame and waits
        self.assertIsNotNone(server._teardown_call)
        fake_transport(client).loseConnection()
        pump.flush()
        self.assertEqual((server.closeHandshakeTimeoutCall, server._teardown_call), (None, None))
        self.assert_no_timers()

    def test_events_while_closing_are_not_errors(self) -> None:
        """Events published once the closing handshake began end the session quietly."""
        client, server, pump = self.connect(subscribe_all=True)
        server.sendClose(1000)
        new_job(self.jobs)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.events.subscriber_count(), 0)
        pump.flush()
        self.assertEqual(client.ending()[:2], (True, 1000))

    def test_connection_limit_answers_503(self) -> None:
        """Past max_connections the opening handshake is refused with HTTP 503, a Retry-After
        and the JSON envelope."""
        factory = self.make_factory(max_connections=1)
        first, _, _ = self.connect(factory=factory)
        self.assertTrue(first.opened)
        raw, server, pump = self.raw_connect(factory)
        fake_transport(raw).write(UPGRADE_REQUEST + b"Sec-WebSocket-Protocol: lpa.jobs.v1\r\n\r\n")
        pump.flush()
        status, headers, body = http_answer(raw.received)
        self.assertEqual(status, "HTTP/1.1 503 Service Unavailable")
        self.assertEqual(headers["retry-after"], "10")
        self.assertEqual(
            (body["error"]["code"], body["error"]["retryable"]), ("TOO_MANY_CONNECTIONS", True)
        )
        self.assertTrue(fake_transport(server).disconnected)

    def test_bad_handshake_answered_with_envelope(self) -> None:
        """Another bad handshake (an unsupported WebSocket version) is refused in the envelope
        too, with the headers Autobahn adds (the versions it speaks)."""
        raw, _server, pump = self.raw_connect()
        fake_transport(raw).write(
            UPGRADE_REQUEST.replace(b"Version: 13", b"Version: 99") + b"\r\n"
        )
        pump.flush()
        status, headers, body = http_answer(raw.received)
        self.assertTrue(status.startswith("HTTP/1.1 4"), status)
        self.assertEqual(body["error"]["code"], "WEBSOCKET_HANDSHAKE_FAILED")
        self.assertIn("sec-websocket-version", headers)

    def test_close_releases_everything(self) -> None:
        """A closed connection leaves no EventLog subscriber and no pending timer."""
        client, _server, pump = self.connect()
        self.assertEqual(self.events.subscriber_count(), 1)
        client.sendClose(1000)
        pump.flush()
        self.assertEqual(client.ending()[:2], (True, 1000))
        self.assertEqual(self.events.subscriber_count(), 0)
        self.clock.advance(60)
        self.assert_no_timers()


class _ReturnsUnfiredDeferred(JobStreamProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> Any:
        super().onMessage(payload, isBinary)
        return Deferred()  # never fires


class HookTests(ProtocolTestBase):
    def test_autobahn_does_not_await_hooks(self) -> None:
        """Autobahn calls onMessage synchronously and ignores what it returns (STYLE pin)."""
        factory = self.make_factory()
        factory.protocol = _ReturnsUnfiredDeferred
        client, _server, pump = self.connect(factory=factory)
        client.take()
        client.send_json({"action": "subscribe"})
        client.send_json({"action": "unsubscribe"})
        pump.flush()
        self.assertEqual([m["event"] for m in client.take()], ["subscribed", "unsubscribed"])


class HeartbeatTests(ProtocolTestBase):
    def tick(self, pump: iosim.IOPump, seconds: float, step: float = 0.25) -> None:
        """Advance the clock in small steps, pumping bytes after each (as real time would)."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            pump.flush()

    def test_silent_client_dropped_after_timeout(self) -> None:
        """The server pings every 5 s and drops a client silent for 10 s."""
        client, _server, pump = self.connect(SilentClient)
        self.tick(pump, 9.75)
        self.assertIsNone(client.closed)
        self.tick(pump, 0.5)
        self.assertIsNotNone(client.closed)
        self.assertFalse(client.ending()[0])
        self.assertEqual(self.events.subscriber_count(), 0)
        self.clock.advance(60)
        self.assert_no_timers()

    def test_answering_client_stays(self) -> None:
        """A client that answers the pings stays connected indefinitely."""
        client, _server, pump = self.connect()
        self.tick(pump, 60)
        self.assertIsNone(client.closed)

    def test_client_ping_answered(self) -> None:
        """A client's ping gets a pong with the same payload."""
        client, _server, pump = self.connect()
        client.sendPing(b"are-you-there")
        pump.flush()
        self.assertEqual(client.pongs, [b"are-you-there"])
