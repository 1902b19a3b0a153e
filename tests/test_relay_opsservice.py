"""The relay's ops port as a service: it listens on real loopback, names its URL, survives a port
it cannot take, and stops streams, port and feed in that order."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from lpa.relay.config import RelayConfig
from lpa.relay.feed import JobUpdateFeed
from lpa.relay.metrics import RelayMetrics
from lpa.relay.ops import OpsRoot, Readiness
from lpa.relay.opsservice import OpsService, make_ops_service
from tests.logcheck import capture_events
from tests.loopback import listen_tcp, port_number, stop
from tests.rawhttp import eventually, exchange
from tests.test_relay_feed import ListenConnection

DSN = "postgresql://relay@db.example/pm"


def ops_service(connection: ListenConnection, *, bind: str = "127.0.0.1",
                port: int = 0) -> OpsService:
    """The relay's own ops service on ``bind:port``, its feed on ``connection``."""
    return make_ops_service(
        RelayConfig(database_url=DSN, ops_bind=bind, ops_port=port),
        reactor=reactor,
        clock=Clock(),
        metrics=RelayMetrics(),
        links=list,
        database_up=lambda: None,
        pool_stats=lambda: None,
        connection_factory=lambda: connection,
    )


def _no_ipv6_loopback() -> str | None:
    """Why this machine cannot listen on ``::1`` (None: it can)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        return f"no IPv6 loopback here: {error}"
    return None


class _Boom(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        raise RuntimeError("secret internals")


class ListeningTests(TestCase):
    timeout = 20

    async def start(self, service: OpsService) -> Any:
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return await service.listening

    async def test_starts_feed_then_listens_and_logs_its_url(self) -> None:
        """Started, the feed connects and LISTENs, the port listens on loopback, and one info
        line names the URL; the site shows no traceback and logs no factory start."""
        events = capture_events(self)
        connection = ListenConnection()
        service = ops_service(connection)
        self.assertIsNone(service.url)
        port = await self.start(service)
        number = port_number(port)
        self.assertEqual(service.url, f"http://127.0.0.1:{number}/")
        self.assertEqual((connection.dsn, connection.operations, service.feed.listening),
                         (DSN, ["LISTEN job_update"], True))
        [said] = [e for e in events if "ops port:" in e.get("log_format", "")]
        self.assertEqual((said["log_level"], said["url"]), (LogLevel.info, service.url))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", number)
        answer = await exchange(endpoint, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
        self.assertEqual((answer.status, answer.envelope()), (200, {"status": "alive"}))
        service.root.putChild(b"boom", _Boom())
        answer = await exchange(endpoint, b"GET /boom HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
        self.assertEqual(answer.status, 500)
        self.assertNotIn(b"secret internals", answer.raw)
        self.assertNotIn(b"Traceback", answer.raw)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([e["log_format"] for e in events if e.get("factory") is port.factory],
                         [])

    async def test_listens_on_ipv6_loopback(self) -> None:
        """bind = "::1" listens there, and the URL puts the address in brackets."""
        reason = _no_ipv6_loopback()
        if reason is not None:
            raise SkipTest(reason)
        service = ops_service(ListenConnection(), bind="::1")
        port = await self.start(service)
        self.assertEqual(service.url, f"http://[::1]:{port_number(port)}/")

    async def test_a_taken_port_is_one_error_and_the_relay_goes_on(self) -> None:
        """A port already in use: one error line naming where and why, no traceback;
        ``listening`` fires None, there is no URL, and stopping still stops the feed."""
        events = capture_events(self)
        taken = listen_tcp(Factory())
        self.addCleanup(stop, taken)
        connection = ListenConnection()
        service = ops_service(connection, port=port_number(taken))
        self.assertIsNone(await self.start(service))
        self.assertIsNone(service.url)
        [said] = [e for e in events if e.get("log_level") == LogLevel.error]
        text = formatEvent(said)
        self.assertIn(f"ops port 127.0.0.1:{port_number(taken)} cannot listen (", text)
        self.assertIn("Address already in use", text)
        self.assertIn("set [ops] port to a free port or [ops] enabled = false", text)
        self.assertEqual([e for e in events if "log_failure" in e], [])
        await service.stopService()
        self.assertTrue(connection.closed)

    async def test_stop_ends_streams_then_closes_the_port_then_the_feed(self) -> None:
        """stopService ends each open event stream (the browser sees a complete response),
        fires once the port is closed (a new connection is refused), and stops the feed."""
        connection = ListenConnection()
        service = ops_service(connection)
        number = port_number(await self.start(service))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", number)
        streaming = Deferred.fromCoroutine(exchange(
            endpoint, b"GET /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        await eventually(lambda: service.root.events.client_count == 1)
        self.assertFalse(connection.closed)
        await service.stopService()
        self.assertIsNone(service.port)
        self.assertTrue(connection.closed and connection.detector.stopped)
        answer = await streaming
        self.assertEqual((answer.status, answer.held), (200, False))
        self.assertIn(b"retry: 3000", answer.body)
        self.assertEqual(service.root.events.client_count, 0)
        with self.assertRaises(ConnectionRefusedError):
            await connectProtocol(endpoint, Protocol())


class HeldEndpoint:
    """An endpoint whose ``listen`` answers only when the test says (the port comes up late)."""

    def __init__(self) -> None:
        self.listening: Deferred[Any] = Deferred()
        self.factory: Any = None

    def listen(self, factory: Any) -> Deferred[Any]:
        self.factory = factory
        return self.listening


class StandInPort:
    """A listening port on ``host``:12480 whose close ends when ``closing`` fires."""

    def __init__(self, closing: Deferred[None] | None = None, host: str = "127.0.0.1") -> None:
        self.stopped = 0
        self.closing = closing if closing is not None else succeed(None)
        self.host = host

    def getHost(self) -> IPv4Address | IPv6Address:  # noqa: N802
        if ":" in self.host:
            return IPv6Address("TCP", self.host, 12480)
        return IPv4Address("TCP", self.host, 12480)

    def stopListening(self) -> Deferred[None]:  # noqa: N802
        self.stopped += 1
        return self.closing


def held_ops_service(endpoint: HeldEndpoint, connection: ListenConnection) -> OpsService:
    """An ops service on ``endpoint``, its feed on ``connection``, all on a Clock."""
    feed = JobUpdateFeed(DSN, clock=Clock(), connection_factory=lambda: connection)
    readiness = Readiness([])
    root = OpsRoot(feed=feed, readiness=readiness, registry=RelayMetrics().registry,
                   clock=Clock())
    return OpsService(feed=feed, root=root, endpoint=endpoint, where="127.0.0.1:12480",
                      scheme="http", readiness=readiness)


class StandInPortTests(SynchronousTestCase):
    def test_url_of_each_address_family(self) -> None:
        """No URL before the port is up; an IPv4 host as is, an IPv6 one in brackets."""
        for host, url in (("127.0.0.1", "http://127.0.0.1:12480/"),
                          ("fd00::7", "http://[fd00::7]:12480/")):
            endpoint = HeldEndpoint()
            service = held_ops_service(endpoint, ListenConnection())
            service.startService()
            self.assertIsNone(service.url)
            with capturedLogs():
                endpoint.listening.callback(StandInPort(host=host))
            self.assertEqual(service.url, url)
            self.successResultOf(service.stopService())

    def test_a_port_that_comes_up_after_stop_is_closed_again(self) -> None:
        """Stopped before the port came up: when it does, it is closed at once, ``listening``
        fires None and nothing says the port is up."""
        connection = ListenConnection()
        endpoint = HeldEndpoint()
        service = held_ops_service(endpoint, connection)
        service.startService()
        self.assertIs(endpoint.factory.resource, service.root)
        self.successResultOf(service.stopService())
        self.assertTrue(connection.closed)
        port = StandInPort()
        with capturedLogs() as logged:
            endpoint.listening.callback(port)
        self.assertIsNone(self.successResultOf(service.listening))
        self.assertEqual((port.stopped, service.port, service.url), (1, None, None))
        self.assertEqual(list(logged), [])
