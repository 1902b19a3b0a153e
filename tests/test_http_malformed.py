"""Malformed HTTP thrown at a real loopback agent Site: every answer is the JSON envelope.

A generator makes a few hundred requests: hand-written cases for each thing twisted.web, Klein or
Autobahn refuse on their own (request line, header syntax and limits, methods, percent-escapes,
Content-Length, chunked bodies, Transfer-Encoding, Host, WebSocket handshakes, form bodies) and
seeded random byte mutations of valid requests.  Each goes over its own raw TCP connection (TLS
is irrelevant to framing; a handful go over mutual TLS too), and each answer must be the
envelope.  The only answers without an envelope body are those HTTP makes bodiless: a HEAD
request's answer carries the envelope's headers but no body (RFC 9110 §9.3.2).  No exchange may
end without an answer, and nothing may be logged as an error or a traceback.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

import attr
from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from lpa.agent.http.api import AgentApi
from lpa.agent.ws import JobStreamFactory, make_ws_resource
from lpa.protocol import SUBPROTOCOL
from tests.certs import make_test_pki
from tests.fakes import FakeBackend, FakeSystem
from tests.fakes_jobs import FakeJobManager
from tests.logcheck import capture_events
from tests.loopback import listen_ssl, listen_tcp, port_number
from tests.rawhttp import Answer, exchange

HEAD_END = b"\r\n\r\n"
WS_HEADERS = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
WS_KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
WS_PROTOCOL = b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n"
APPLY = b"POST /api/v1/patches/apply HTTP/1.1\r\nHost: agent\r\n"


@attr.s(frozen=True, auto_attribs=True)
class Case:
    """One malformed request and the statuses it may get (empty: any envelope answer)."""

    name: str
    payload: bytes
    statuses: tuple[int, ...] = ()

    @property
    def head_only(self) -> bool:
        return self.payload.startswith(b"HEAD ")


def _get(target: bytes, headers: bytes = b"Host: agent\r\n", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + target + b" " + version + b"\r\n" + headers + b"\r\n"


def _post(target: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"POST " + target + b" HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        + headers
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def _chunked(body: bytes, target: bytes = b"/api/v1/patches/apply") -> bytes:
    return (
        b"POST " + target + b" HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body
    )


def handwritten() -> Iterator[Case]:
    """One case per refusal path of twisted.web, Klein, Autobahn and our own gate."""
    # request line
    for name, line in [
        ("no target", b"GET"),
        ("http/0.9", b"GET /"),
        ("four parts", b"GET / HTTP/1.1 x"),
        ("double space", b"GET  / HTTP/1.1"),
        ("leading space", b" GET / HTTP/1.1"),
        ("tabs", b"GET\t/\tHTTP/1.1"),
        ("lower-case version", b"GET / http/1.1"),
        ("version without minor", b"GET / HTTP/1"),
        ("bad method char", b"G@T / HTTP/1.1"),
        ("del in target", b"GET /\x7f HTTP/1.1"),
        ("nul in target", b"GET /\x00 HTTP/1.1"),
        ("8-bit target", b"GET /\xff\xfe HTTP/1.1"),
        ("binary garbage", bytes(range(1, 32)) + b"\xff" * 10),
        ("tls hello on plain port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40),
    ]:
        yield Case(f"request line: {name}", line + b"\r\nHost: agent" + HEAD_END, (400, 404))
    for version in (b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/3.0"):
        yield Case(f"version {version!r}", _get(b"/health", version=version), (505,))
    yield Case("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (505,))
    yield Case("blank lines only", b"\r\n\r\n\r\n\r\n", (400,))
    yield Case("request line 20 kB", _get(b"/" + b"a" * 20_000), (414,))
    yield Case("request line 17 kB unterminated", b"GET /" + b"a" * 17_000, (414,))
    yield Case(
        "request line 16 kB then headers",
        _get(b"/" + b"a" * 16_300, b"X-A: " + b"b" * 200 + b"\r\n"),
        (431,),
    )
    # headers
    for name, header in [
        ("no colon", b"Foo"),
        ("space in name", b"Bad Name: x"),
        ("empty name", b": value"),
        ("8-bit name", b"X-\xff: y"),
        ("nul in value", b"Foo: a\x00b"),
        ("cr in value", b"Foo: a\rb"),
        ("continuation first", b" folded: x"),
        ("separator in name", b"Fo(o): x"),
    ]:
        yield Case(
            f"header: {name}", _get(b"/health", b"Host: agent\r\n" + header + b"\r\n"), (400,)
        )
    yield Case("obs-fold header", _get(b"/health", b"Host: agent\r\nX-A: a\r\n b\r\n"))
    many = b"".join(b"X-%d: v\r\n" % i for i in range(600))
    yield Case("600 headers", _get(b"/health", many), (431,))
    yield Case("one 20 kB header", _get(b"/health", b"X-Big: " + b"v" * 20_000 + b"\r\n"), (431,))
    big = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 990) for i in range(17))
    yield Case("headers 17 kB total", _get(b"/health", big), (431,))
    yield Case("duplicate host", _get(b"/health", b"Host: a\r\nHost: b\r\n"), (400,))
    for host in (b"ex ample", b"\xff\xfe", b"[::1", b"a/b", b"a@b", b"a?b", b"\xc3\xa9t\xc3\xa9"):
        yield Case(f"host {host!r}", _get(b"/api/v1/jobs", b"Host: " + host + b"\r\n"), (400,))
    yield Case("no host, HTTP/1.0", _get(b"/api/v1/health", b"", b"HTTP/1.0"), (200,))
    # methods
    for method in (b"FOO", b"get", b"TRACE", b"PATCH", b"M-SEARCH", b"PROPFIND", b"X" * 5000):
        request = method + b" /api/v1/jobs HTTP/1.1\r\nHost: agent" + HEAD_END
        yield Case(f"method {method[:10]!r}", request, (405,))
    yield Case("CONNECT", b"CONNECT agent:443 HTTP/1.1\r\nHost: agent:443" + HEAD_END, (404, 405))
    yield Case("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: agent" + HEAD_END, (200,))
    yield Case("GET *", b"GET * HTTP/1.1\r\nHost: agent" + HEAD_END, (405,))
    yield Case("absolute-form target", _get(b"http://agent/api/v1/health"), (404,))
    yield Case("HEAD unknown path", b"HEAD /nope HTTP/1.1\r\nHost: agent" + HEAD_END, (404,))
    yield Case("HEAD health", b"HEAD /health HTTP/1.1\r\nHost: agent" + HEAD_END, (200,))
    # percent-escapes
    for target in (
        b"/api/v1/%ff", b"/api/v1/jobs/%c3%28", b"/api/v1/%E2%82", b"/%ed%a0%80",
        b"/api/v1/packages/%fe%ff",
    ):
        yield Case(f"path {target!r}", _get(target), (400,))
    for target in (b"/api/v1/%", b"/api/v1/%zz", b"/%00", b"/api/v1/packages/%2e%2e", b"//api//v1"):
        yield Case(f"path {target!r}", _get(target), (400, 404))
    yield Case("query not utf-8", _get(b"/api/v1/packages?name=%ff"), (400,))
    yield Case("query percent garbage", _get(b"/api/v1/jobs?limit=%zz&&=&%"), (400,))
    # Content-Length
    for value in (b"abc", b"-1", b"1e3", b"+5", b"0x10", b"5, 5", b"5 5", b""):
        yield Case(
            f"content-length {value!r}",
            APPLY + b"Content-Length: " + value + HEAD_END + b"{}",
            (400,),
        )
    yield Case(
        "two content-lengths",
        APPLY + b"Content-Length: 2\r\nContent-Length: 2" + HEAD_END + b"{}",
        (400,),
    )
    yield Case(
        "content-length and chunked",
        APPLY + b"Content-Length: 2\r\nTransfer-Encoding: chunked" + HEAD_END + b"0\r\n\r\n",
        (400,),
    )
    yield Case(
        "huge content-length",
        APPLY + b"Content-Length: 99999999999999999999" + HEAD_END + b"{}",
        (413,),
    )
    yield Case(
        "content-length over the limit",
        APPLY + b"Content-Length: 5000000" + HEAD_END + b"{",
        (413,),
    )
    # Transfer-Encoding and chunked bodies
    for coding in (b"gzip", b"gzip, chunked", b"chunked, gzip", b"x"):
        yield Case(
            f"transfer-encoding {coding!r}",
            APPLY + b"Transfer-Encoding: " + coding + HEAD_END,
            (501,),
        )
    yield Case(
        "chunked twice",
        APPLY + b"Transfer-Encoding: chunked\r\n" * 2 + b"\r\n0\r\n\r\n",
        (400,),
    )
    for name, body in [
        ("bad hex", b"zz\r\n{}\r\n0\r\n\r\n"),
        ("negative size", b"-2\r\n{}\r\n0\r\n\r\n"),
        ("missing crlf after data", b"2\r\n{}XX0\r\n\r\n"),
        # a chunk declared larger than what follows: incomplete, so 408 after the timeout
        ("size overflow", b"ffffffffffffffffffffffff\r\n{}\r\n"),
        ("nul extension", b"2;\x00\r\n{}\r\n0\r\n\r\n"),
        ("space in size", b"2 2\r\n{}\r\n0\r\n\r\n"),
    ]:
        yield Case(f"chunked: {name}", _chunked(body), (400, 408, 413))
    # twisted.web skips trailers unread: the body before them is served
    yield Case("chunked: bad trailer", _chunked(b"2\r\n{}\r\n0\r\nno colon\x00\r\n\r\n"))
    oversized = b"%x\r\n%s\r\n0\r\n\r\n" % (9000, b" " * 9000)
    yield Case("chunked over the limit", _chunked(oversized), (413,))
    # bodies
    for name, body in [
        ("not json", b"{nope"),
        ("nan", b'{"dry_run": NaN}'),
        ("not utf-8", b'{"packages": ["\xff"]}'),
        ("deep", b"[" * 3000),
        ("huge int", b'{"reboot_delay_seconds": ' + b"9" * 5000 + b"}"),
        ("array", b"[1]"),
    ]:
        yield Case(f"json: {name}", _post(b"/api/v1/patches/apply", body), (400,))
    yield Case(
        "form body",
        APPLY
        + b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 9"
        + HEAD_END
        + b"a=%ff&b=c",
        (400,),
    )
    yield Case(
        "broken multipart body",
        APPLY
        + b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 12"
        + HEAD_END
        + b"--x\r\nbroken\r\n",
        (400,),
    )
    # WebSocket handshakes Autobahn refuses
    for name, headers in [
        ("no key", WS_HEADERS + b"Sec-WebSocket-Version: 13\r\n"),
        ("unknown version", WS_HEADERS + WS_KEY + b"Sec-WebSocket-Version: 7\r\n"),
        ("bad key", WS_HEADERS + b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n"),
        ("no connection", b"Upgrade: websocket\r\n" + WS_KEY + b"Sec-WebSocket-Version: 13\r\n"),
        ("two keys", WS_HEADERS + WS_KEY + WS_KEY + b"Sec-WebSocket-Version: 13\r\n"),
        ("no subprotocol", WS_HEADERS + WS_KEY + b"Sec-WebSocket-Version: 13\r\n"),
    ]:
        request = _get(b"/api/v1/ws/jobs", b"Host: agent\r\n" + headers)
        yield Case(f"websocket: {name}", request, (400, 426))


VALID = [
    _get(b"/api/v1/health"),
    _get(b"/api/v1/jobs?limit=5&status=running"),
    _get(b"/api/v1/packages?name=vim&sort=name"),
    _get(b"/api/v1/system/services/ssh.service"),
    _post(b"/api/v1/patches/apply", b'{"dry_run": true, "packages": ["vim"]}'),
    _post(b"/api/v1/packages", b'{"packages": [{"name": "vim", "version": "2"}]}'),
    _chunked(b'5\r\n{"dry\r\nc\r\n_run": true}\r\n0\r\n\r\n'),
    b"DELETE /api/v1/jobs/%s HTTP/1.1\r\nHost: agent\r\n\r\n" % str(uuid.UUID(int=7)).encode(),
]


def mutated(seed: int, count: int) -> Iterator[Case]:
    """Valid requests with a few random bytes replaced, inserted or removed in the head."""
    rng = random.Random(seed)
    alphabet = b" \t\r\n:;%/?#@[]\x00\x7f\x80\xff" + bytes(range(0x21, 0x7F, 7))
    for index in range(count):
        template = rng.choice(VALID)
        head_end = template.index(HEAD_END)
        data = bytearray(template)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(0, head_end)
            operation = rng.choice(("replace", "insert", "delete"))
            byte = rng.choice(alphabet)
            if operation == "replace":
                data[at] = byte
            elif operation == "insert":
                data.insert(at, byte)
            elif len(data) > 1:
                del data[at]
        yield Case(f"mutation {index}", bytes(data))


class _MalformedCase(TestCase):
    timeout = 120
    #: server.timeout_seconds of the Site under test: a mutation that leaves a request
    #: incomplete (a longer Content-Length, a lost CRLF) is answered 408 after this
    site_timeout = 2.0

    def setUp(self) -> None:
        self.events = capture_events(self)
        self.build()

    def build(self, max_ws_connections: int = 64) -> None:
        jobs = FakeJobManager(reactor)
        factory = JobStreamFactory(
            jobs.events, jobs, clock=reactor, max_connections=max_ws_connections
        )
        self.api = AgentApi(
            jobs=jobs,
            backend=FakeBackend(),
            system=FakeSystem(),
            clock=reactor,
            version="test",
            rate_limiter=None,
            ws_resource=make_ws_resource(factory),
            max_body_bytes=8192,
        )

    def listen(self, context: Any = None) -> int:
        site = self.api.site(timeout_seconds=self.site_timeout)
        port = listen_tcp(site) if context is None else listen_ssl(site, context)
        self.addCleanup(port.stopListening)
        return port_number(port)

    async def run_cases(self, endpoint: Any, cases: list[Case], width: int = 20) -> None:
        """Send every case (``width`` at a time) and check each answer."""
        problems: list[str] = []
        for start in range(0, len(cases), width):
            batch = cases[start : start + width]
            answers = await defer.gatherResults(
                [
                    defer.Deferred.fromCoroutine(
                        exchange(endpoint, case.payload, head_only=case.head_only)
                    )
                    for case in batch
                ]
            )
            for case, answer in zip(batch, answers, strict=True):
                problem = self.problem(case, answer)
                if problem:
                    problems.append(f"{case.name}: {problem}")
        self.assertEqual(problems, [], "\n".join(problems))
        self.assertNoErrorsLogged()

    def problem(self, case: Case, answer: Answer) -> str | None:
        """What is wrong with ``answer`` to ``case``, or None."""
        if answer.held:
            return "the server held the connection without a complete answer"
        if answer.status is None:
            return f"closed without an answer (received {answer.raw[:60]!r})"
        if case.statuses and answer.status not in case.statuses:
            return f"status {answer.status}, expected one of {case.statuses}: {answer.body[:200]!r}"
        if answer.header(b"content-type") != b"application/json":
            return f"Content-Type {answer.header(b'content-type')!r}: {answer.raw[:200]!r}"
        if case.head_only:
            return None  # RFC 9110 §9.3.2: no body in an answer to HEAD
        try:
            envelope = json.loads(answer.body)
        except ValueError:
            return f"body is not JSON: {answer.body[:200]!r}"
        return _envelope_problem(envelope, answer.status)

    def assertNoErrorsLogged(self) -> None:
        bad = [
            e
            for e in self.events
            if e.get("log_failure") is not None
            or e.get("log_level") in (LogLevel.error, LogLevel.critical)
            or e.get("isError")
        ]
        self.assertEqual(bad, [])
        self.assertEqual(self.flushLoggedErrors(), [])


async def _drain() -> None:
    """One reactor turn, so an aborted connection is gone before the test ends."""
    await deferLater(reactor, 0, lambda: None)


def _envelope_problem(envelope: Any, status: int) -> str | None:
    if not isinstance(envelope, dict) or sorted(envelope) != [
        "data", "error", "request_id", "success", "timestamp"
    ]:
        return f"not the envelope: {envelope!r:.200}"
    if envelope["success"] is not (status < 400):
        return f"success {envelope['success']} with status {status}"
    if status >= 400:
        error = envelope["error"]
        if not isinstance(error, dict) or sorted(error) != [
            "code", "details", "message", "retryable"
        ]:
            return f"bad error member: {error!r:.200}"
        if envelope["data"] is not None:
            return "an error with data"
    return None


class MalformedOverTcpTests(_MalformedCase):
    async def test_handwritten_cases(self) -> None:
        """Each refusal path of twisted.web, Klein and Autobahn answers the envelope."""
        port = self.listen()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await self.run_cases(endpoint, list(handwritten()))

    async def test_websocket_connections_full(self) -> None:
        """Autobahn's 503 for a WebSocket past max_connections is an envelope too."""
        self.build(max_ws_connections=1)
        port = self.listen()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        handshake = _get(
            b"/api/v1/ws/jobs",
            b"Host: agent\r\n"
            + WS_HEADERS
            + WS_KEY
            + WS_PROTOCOL
            + b"Sec-WebSocket-Version: 13\r\n",
        )
        opened: defer.Deferred[bytes] = defer.Deferred()

        class _Holder(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(handshake)

            def dataReceived(self, data: bytes) -> None:
                if not opened.called:
                    opened.callback(data)

        first = await connectProtocol(endpoint, _Holder())
        self.assertIn(b"101", (await opened).split(b"\r\n")[0])
        try:
            await self.run_cases(endpoint, [Case("second websocket", handshake, (503,))])
        finally:
            first.transport.abortConnection()
            await _drain()

    async def test_random_mutations(self) -> None:
        """300 seeded byte mutations of valid requests are all answered with the envelope."""
        port = self.listen()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await self.run_cases(endpoint, list(mutated(seed=10, count=300)), width=30)


class MalformedOverTlsTests(_MalformedCase):
    async def test_handful_over_mtls(self) -> None:
        """The same refusals over mutual TLS (the agent's real transport) are envelopes."""
        pki = make_test_pki(self.mktemp())
        port = self.listen(pki.server_options())
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, pki.client_options("good"))
        prefixes = (
            "request line 20",
            "header: no",
            "600",
            "content-length ",
            "chunked: bad",
            "path b'/api/v1/%ff'",
            "websocket: unk",
            "version b'HTTP/2.0'",
        )
        cases = [c for c in handwritten() if c.name.startswith(prefixes)]
        self.assertGreater(len(cases), 8)
        await self.run_cases(endpoint, cases, width=5)
