"""AgentApi.site(): raw HTTP/1.1 through the real Site: body limits enforced while reading,
twisted.web's own refusals in the envelope, server.timeout_seconds, refusal log lines."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel

from lpa.agent.http.api import BoundedRequest, bounded_request_factory
from lpa.agent.metrics import AgentMetrics
from tests.api_helpers import ApiTestCase
from tests.logcheck import capture_events


class SiteTests(ApiTestCase):
    def exchange(self, raw: bytes) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
        """Send raw bytes to a fresh connection; return status, headers and the parsed body."""
        site = self.api.site()
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        if headers.get(b"Transfer-Encoding") == b"chunked":
            body = _dechunk(body)
        protocol.connectionLost(None)
        return int(lines[0].split()[1]), headers, json.loads(body)

    def test_declared_length_too_large(self) -> None:
        """A Content-Length over the limit is 413 and the body is not buffered."""
        raw = (
            b"POST /api/v1/patches/apply HTTP/1.1\r\nHost: agent\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b" " * 100000
        )
        code, headers, body = self.exchange(raw)
        self.assertEqual((code, body["error"]["code"]), (413, "PAYLOAD_TOO_LARGE"))
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(self.jobs.submitted, [])

    def test_chunked_body_too_large(self) -> None:
        """A chunked body that grows past the limit is 413 too."""
        chunk = b"%x\r\n%s\r\n" % (3000, b" " * 3000)
        raw = (
            b"POST /api/v1/patches/apply HTTP/1.1\r\nHost: agent\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n"
        )
        code, _, body = self.exchange(raw)
        self.assertEqual((code, body["error"]["code"]), (413, "PAYLOAD_TOO_LARGE"))
        self.assertEqual(self.jobs.submitted, [])

    def test_small_body_served(self) -> None:
        """A request within the limit is served through the real Site."""
        payload = b'{"dry_run": true}'
        raw = (
            b"POST /api/v1/patches/apply HTTP/1.1\r\nHost: agent\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        code, _, body = self.exchange(raw)
        self.assertEqual((code, body["data"]["operation"]), (202, "patch_apply"))

    def test_duplicate_host(self) -> None:
        """Two Host headers are 400 DUPLICATE_HEADERS, as the original refused."""
        raw = b"GET /api/v1/jobs HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
        code, _, body = self.exchange(raw)
        self.assertEqual((code, body["error"]["code"]), (400, "DUPLICATE_HEADERS"))

    def test_disconnect_cancels_backend_query(self) -> None:
        """A client that goes away cancels the package-manager query; no error is logged."""
        cancelled: list[bool] = []
        pending: Deferred[Any] = Deferred(lambda d: cancelled.append(True))
        self.patch(self.backend, "list_packages", lambda name_filter=None, status=None: pending)
        site = self.api.site()
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"GET /api/v1/packages HTTP/1.1\r\nHost: agent\r\n\r\n")
        self.assertEqual(cancelled, [])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(cancelled, [True])

    def test_bounded_request_drops_excess(self) -> None:
        """The request class keeps nothing of an oversized body."""
        request = bounded_request_factory(10)(DummyChannel())
        request.gotLength(None)
        content = request.content
        assert content is not None
        self.addCleanup(content.close)
        request.handleContentChunk(b"x" * 8)
        self.assertFalse(request.body_too_large)
        request.handleContentChunk(b"x" * 8)
        self.assertTrue(request.body_too_large)
        content.seek(0)
        self.assertEqual(content.read(), b"x" * 8)
        declared = BoundedRequest(DummyChannel())
        declared.gotLength(BoundedRequest.max_body_bytes + 1)
        declared.handleContentChunk(b"x" * 100)
        self.assertTrue(declared.body_too_large)
        assert declared.content is not None
        declared.content.seek(0)
        self.assertEqual(declared.content.read(), b"")


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def _split(raw: bytes) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    """Status, headers and envelope of the one response in ``raw``."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    if headers.get(b"Transfer-Encoding") == b"chunked":
        body = _dechunk(body)
    return int(lines[0].split()[1]), headers, json.loads(body)


class ChannelTests(ApiTestCase):
    """EnvelopeChannel over a StringTransport: refusals, deadlines, closing, logging."""

    timeout_seconds = 5.0

    def setUp(self) -> None:
        super().setUp()
        self.site = self.api.site(timeout_seconds=self.timeout_seconds)
        self.events = capture_events(self)

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        protocol.makeConnection(transport)
        return protocol, transport

    def lose(self, protocol: Any) -> None:
        """The transport went away; nothing of the connection may stay scheduled."""
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def refused(
        self, raw: bytes
    ) -> tuple[int, dict[bytes, bytes], dict[str, Any], StringTransport]:
        protocol, transport = self.connect()
        protocol.dataReceived(raw)
        code, headers, body = _split(transport.value())
        self.assertEqual(headers[b"Connection"], b"close")
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(
            int(headers[b"Content-Length"]), len(json.dumps(body, separators=(",", ":")))
        )
        self.assertIs(body["success"], False)
        self.lose(protocol)
        return code, headers, body, transport

    def test_request_line_too_long(self) -> None:
        """A request line over 16 KiB is 414 URI_TOO_LONG in the envelope, not a silent hold."""
        for raw in (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", b"GET /" + b"a" * 17_000):
            code, _, body, _ = self.refused(raw)
            self.assertEqual((code, body["error"]["code"]), (414, "URI_TOO_LONG"))

    def test_headers_too_large(self) -> None:
        """Headers over 16 KiB in total, one huge header or over 500 headers are 431."""
        many = b"".join(b"X-%d: v\r\n" % i for i in range(501))
        big = b"X-Big: " + b"v" * 20_000 + b"\r\n"
        two = b"X-A: " + b"v" * 9000 + b"\r\nX-B: " + b"v" * 9000 + b"\r\n"
        for headers in (many, big, two):
            code, _, body, _ = self.refused(b"GET /health HTTP/1.1\r\n" + headers + b"\r\n")
            self.assertEqual((code, body["error"]["code"]), (431, "HEADERS_TOO_LARGE"))

    def test_twisted_web_400s_named(self) -> None:
        """What twisted.web answered with a bare 400 is an envelope naming the bad part."""
        cases = [
            (b"GET / HTTP/1.1 x\r\n\r\n", 400, "request_line"),
            (b"GET /health HTTP/1.1\r\nNo colon\r\n\r\n", 400, "header"),
            (b"POST /x HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400, "content_length"),
            (
                b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                "transfer_encoding",
            ),
            (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunked"),
            (b"\r\n\r\n", 400, "syntax"),
        ]
        for raw, status, reason in cases:
            code, _, body, _ = self.refused(raw)
            self.assertEqual((code, body["error"]["details"]), (status, {"reason": reason}), raw)
        code, _, body, _ = self.refused(b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
        self.assertEqual((code, body["error"]["code"]), (501, "NOT_IMPLEMENTED"))
        code, _, body, _ = self.refused(b"GET /health HTTP/2.0\r\n\r\n")
        self.assertEqual((code, body["error"]["code"]), (505, "HTTP_VERSION_NOT_SUPPORTED"))

    def test_refusal_closes_after_linger(self) -> None:
        """After a refusal the rest of the request is dropped and the connection closed shortly."""
        from lpa.agent.http.channel import LINGER_SECONDS

        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1 x\r\n\r\n")
        answer = transport.value()
        protocol.dataReceived(b"GET /health HTTP/1.1\r\n\r\n" * 3)
        self.assertEqual(transport.value(), answer)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(transport.disconnecting)
        self.lose(protocol)

    def test_declared_body_too_large_answered_at_once(self) -> None:
        """A Content-Length over the limit is 413 before the body is sent (and instead of a
        100 Continue), not after."""
        code, _, body, _ = self.refused(
            b"POST /api/v1/patches/apply HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"
        )
        self.assertEqual((code, body["error"]["code"]), (413, "PAYLOAD_TOO_LARGE"))
        self.assertEqual(self.jobs.submitted, [])
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"POST /api/v1/patches/apply HTTP/1.1\r\nContent-Length: 100000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
        self.lose(protocol)

    def test_trickled_request_times_out(self) -> None:
        """A client sending one byte a second is cut off with 408 at server.timeout_seconds."""
        protocol, transport = self.connect()
        request = b"GET /api/v1/health HTTP/1.1\r\nHost: agent\r\n\r\n"
        for byte in request[:10]:
            protocol.dataReceived(bytes([byte]))
            self.clock.advance(0.49)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(self.timeout_seconds - 10 * 0.49)
        code, _, body = _split(transport.value())
        self.assertEqual((code, body["error"]["code"]), (408, "REQUEST_TIMEOUT"))
        self.assertTrue(body["error"]["retryable"])
        self.lose(protocol)

    def test_idle_connection_closed_quietly(self) -> None:
        """A connection that sends nothing is closed at the timeout without an answer."""
        protocol, transport = self.connect()
        self.clock.advance(self.timeout_seconds - 0.01)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.01)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.lose(protocol)

    def test_deadline_rearmed_between_requests(self) -> None:
        """Each request of a keep-alive connection gets the whole timeout; idle after is closed."""
        protocol, transport = self.connect()
        request = b"GET /api/v1/health HTTP/1.1\r\nHost: agent\r\n\r\n"
        for _ in range(3):
            self.clock.advance(self.timeout_seconds - 1)
            protocol.dataReceived(request)
            self.assertIn(b"200 OK", transport.value())
            transport.clear()
        self.clock.advance(self.timeout_seconds)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.lose(protocol)

    def test_no_deadline_while_the_agent_works(self) -> None:
        """A slow package-manager query is not cut by the client's timeout."""
        pending: Deferred[Any] = Deferred()
        self.patch(self.backend, "list_packages", lambda name_filter=None, status=None: pending)
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /api/v1/packages HTTP/1.1\r\nHost: agent\r\n\r\n")
        self.clock.advance(10 * self.timeout_seconds)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        pending.callback([])
        self.assertIn(b"200 OK", transport.value())
        self.clock.advance(self.timeout_seconds)
        self.assertTrue(transport.disconnecting)
        self.lose(protocol)

    def test_failure_outside_handlers_is_500_envelope(self) -> None:
        """A failure that escapes every handler is a logged 500 envelope, not an HTML page."""
        from lpa.agent.http.gate import Gate

        class _Broken(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                raise RuntimeError("bug")

        broken = Gate(_Broken(), lambda request: None, self.api._enveloper.write_error)
        self.patch(self.api, "resource", lambda: broken)
        self.site = self.api.site(timeout_seconds=self.timeout_seconds)
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: agent\r\n\r\n")
        code, headers, body = _split(transport.value())
        self.assertEqual((code, body["error"]["code"]), (500, "INTERNAL_ERROR"))
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.lose(protocol)

    def test_refusals_counted_with_the_requests(self) -> None:
        """Every refusal of the connection reaches the site's hook, unthrottled: the metrics
        count it with the requests (route and method "other", the status)."""
        metrics = AgentMetrics(self.clock)
        self.site.on_request_refused = metrics.request_refused
        for _ in range(12):  # past the log throttle's 10 a minute
            self.refused(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")
        self.refused(b"GET / HTTP/1.1 x\r\n\r\n")
        counted = {
            sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(generate_latest(metrics.registry)
                                                         .decode())
            for sample in family.samples
            if sample.name == "lpa_agent_http_requests_total"
            and sample.labels["route"] == "other" and sample.labels["method"] == "other"
        }
        self.assertEqual(counted, {"414": 12, "400": 1})

    def test_refusals_logged_throttled(self) -> None:
        """Each refusal is one info line with the peer; past 10 a minute they are counted."""
        for _ in range(13):
            self.refused(b"GET / HTTP/1.1 x\r\n\r\n")
        lines = [e for e in self.events if e.get("log_format", "").startswith("request from")]
        self.assertEqual(len(lines), 10)
        self.assertEqual(
            formatEvent(lines[0]),
            "request from 127.0.0.1:50000 refused: 400 BAD_REQUEST (The request line must be "
            "METHOD SP TARGET SP HTTP/1.1 (or HTTP/1.0))",
        )
        self.clock.advance(60)
        self.refused(b"GET / HTTP/1.1 x\r\n\r\n")
        last = [e for e in self.events if e.get("log_format", "").startswith("request from")][-1]
        self.assertTrue(formatEvent(last).endswith("(and 3 more like this, not logged)"))
        self.assertEqual(last["suppressed"], 3)

    def test_tls_refusals_logged_throttled(self) -> None:
        """A refused handshake is one warn line with peer and reason, throttled per reason."""
        from OpenSSL import SSL

        _, transport = self.connect()
        no_cert = Failure(SSL.Error([("SSL routines", "", "peer did not return a certificate")]))
        for _ in range(12):
            self.site.handshake_failed(transport, no_cert)
        self.site.handshake_failed(transport, Failure(ConnectionDone()))  # a probe: nothing
        lines = [e for e in self.events if e.get("log_format", "").startswith("TLS handshake")]
        self.assertEqual(len(lines), 10)
        self.assertEqual(
            formatEvent(lines[0]),
            "TLS handshake from 127.0.0.1:50000 refused: no client certificate",
        )
        self.assertEqual(lines[0]["log_level"].name, "warn")
