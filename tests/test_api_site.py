"""AgentApi.site(): raw HTTP/1.1 through the real Site, body limits enforced while reading."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyChannel

from lpa.agent.http.api import BoundedRequest, bounded_request_factory
from tests.api_helpers import ApiTestCase


class SiteTests(ApiTestCase):
    def exchange(self, raw: bytes) -> tuple[int, dict[str, bytes], dict]:
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
        pending: Deferred = Deferred(lambda d: cancelled.append(True))
        self.backend.list_packages = lambda name=None, status=None: pending  # type: ignore[method-assign]
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
        self.addCleanup(request.content.close)
        request.handleContentChunk(b"x" * 8)
        self.assertFalse(request.body_too_large)
        request.handleContentChunk(b"x" * 8)
        self.assertTrue(request.body_too_large)
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"x" * 8)
        declared = BoundedRequest(DummyChannel())
        declared.gotLength(BoundedRequest.max_body_bytes + 1)
        declared.handleContentChunk(b"x" * 100)
        self.assertTrue(declared.body_too_large)
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
