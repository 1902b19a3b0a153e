"""Tests for lpa.tools.client and lpa.tools.stream: URLs, credentials, the REST client on treq
(StubTreq over a scripted agent) and, over real mutual TLS, a real agent and its WebSocket."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, reactor
from twisted.internet import error as neterror
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from lpa import protocol
from lpa.errors import ConfigError
from lpa.tools import stream
from lpa.tools.client import AgentClient, AgentUrl, ClientError, Credentials, make_http_client
from lpa.tools.stream import HandshakeFailed, StreamClosed
from tests.agentclient import start_agent
from tests.certs import make_test_pki
from tests.loopback import listen_tcp, port_number, stop

JOB = "0b0c1f9e-5a43-4a4e-9d51-6f3c1d8e2a10"


def envelope(data: Any = None, error: dict[str, Any] | None = None) -> bytes:
    return json.dumps(protocol.envelope(data, error, request_id="r", timestamp="t")).encode()


class ScriptedAgent(Resource):
    """Answers from a table of (method, path with query) -> list of (status, body).

    The last answer of a list repeats; every request is recorded with its JSON body.
    """

    isLeaf = True

    def __init__(self, answers: dict[tuple[str, str], list[tuple[int, bytes]]]) -> None:
        super().__init__()
        self.answers = answers
        self.requests: list[tuple[str, str, Any]] = []

    def render(self, request: Any) -> bytes:
        method, uri = request.method.decode(), request.uri.decode()
        body = request.content.read()
        self.requests.append((method, uri, json.loads(body) if body else None))
        queue = self.answers.get((method, uri))
        if not queue:
            request.setResponseCode(404)
            return envelope(error={"code": "NOT_FOUND", "message": f"no script for {uri}"})
        status, answer = queue.pop(0) if len(queue) > 1 else queue[0]
        request.setResponseCode(status)
        return answer


def scripted(answers: dict[tuple[str, str], list[tuple[int, bytes]]],
             clock: Clock | None = None) -> tuple[AgentClient, ScriptedAgent]:
    """An AgentClient over StubTreq answering from ``answers``."""
    agent = ScriptedAgent(answers)
    client = AgentClient(StubTreq(agent), AgentUrl("agent.test", 12443), clock=clock or Clock())
    return client, agent


def result(case: SynchronousTestCase, coroutine: Any) -> Any:
    return case.successResultOf(Deferred.fromCoroutine(coroutine))


def failure(case: SynchronousTestCase, coroutine: Any, kind: type = ClientError) -> Any:
    return case.failureResultOf(Deferred.fromCoroutine(coroutine), kind).value


class UrlTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Bare host, host:port and URLs parse; the default port is the original's 12443."""
        self.assertEqual(AgentUrl.parse("web1"), AgentUrl("web1", 12443, True))
        self.assertEqual(AgentUrl.parse("web1:8443"), AgentUrl("web1", 8443, True))
        self.assertEqual(AgentUrl.parse("http://127.0.0.1:80"), AgentUrl("127.0.0.1", 80, False))
        self.assertEqual(AgentUrl.parse("https://[::1]:9").ws_url(), "wss://[::1]:9/api/v1/ws/jobs")
        self.assertEqual(AgentUrl.parse("http://h:1").ws_url(), "ws://h:1/api/v1/ws/jobs")
        self.assertEqual(AgentUrl.parse("h").http_url("/x"), "https://h:12443/x")

    def test_bad(self) -> None:
        """A path, a bad scheme or a bad port is a one-line error."""
        for text in ("https://h/api", "ftp://h", "h:notaport", "https://"):
            self.assertRaises(ClientError, AgentUrl.parse, text)


class CredentialsTests(SynchronousTestCase):
    def test_env_fallback(self) -> None:
        """Options win over LPA_CERT/LPA_KEY/LPA_CA, which fill what is missing."""
        env = {"LPA_CERT": "/e/c", "LPA_KEY": "/e/k", "LPA_CA": "/e/ca"}
        self.assertEqual(Credentials.resolve("/o/c", None, None, env),
                         Credentials("/o/c", "/e/k", "/e/ca"))

    def test_missing_file(self) -> None:
        """A certificate path that does not exist is named in the error."""
        key = self.mktemp()
        open(key, "w").close()
        error = self.assertRaises(ClientError, Credentials("/nonexistent.pem", key).check)
        self.assertIn("/nonexistent.pem", str(error))

    def test_no_certificate(self) -> None:
        """Without any client certificate the error says how to give one."""
        error = self.assertRaises(ClientError, Credentials().tls_options, "h")
        self.assertIn("LPA_CERT", str(error))

    def test_cert_without_key(self) -> None:
        """A certificate without a key is refused before any connection."""
        path = self.mktemp()
        open(path, "w").close()
        self.assertRaises(ClientError, Credentials(path, None, None).check)

    def test_unreadable_pem(self) -> None:
        """A file that is not PEM is a ConfigError naming it (exit 2 at the command line)."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("not a certificate\n")
        error = self.assertRaises(ConfigError, Credentials(path, path, path).tls_options, "h")
        self.assertIn(path, str(error))

    def test_without_ca(self) -> None:
        """Without a CA the system's roots verify the agent; the client certificate is sent."""
        pki = make_test_pki(self.mktemp())
        self.assertIsNotNone(Credentials(pki.good.cert, pki.good.key).tls_options("h"))


class AgentClientTests(SynchronousTestCase):
    def test_data(self) -> None:
        """A success envelope yields its data."""
        client, agent = scripted({("GET", "/api/v1/health"): [(200, envelope({"ok": 1}))]})
        self.assertEqual(result(self, client.health()), {"ok": 1})
        self.assertEqual(agent.requests, [("GET", "/api/v1/health", None)])

    def test_error_envelope(self) -> None:
        """An error envelope becomes a ClientError with code, status, details and retryable."""
        client, _ = scripted({("POST", f"/api/v1/jobs/{JOB}/cancel"): [
            (409, envelope(error={"code": "CANCEL_NOT_ALLOWED", "message": "job is completed",
                                  "details": {"status": "completed"}, "retryable": False}))]})
        error = failure(self, client.cancel(JOB))
        self.assertEqual((error.status, error.code, error.details),
                         (409, "CANCEL_NOT_ALLOWED", {"status": "completed"}))
        self.assertEqual(str(error), "CANCEL_NOT_ALLOWED: job is completed (HTTP 409)")

    def test_not_an_envelope(self) -> None:
        """A non-JSON answer (the original's 405 has an empty body) is reported with its status."""
        client, _ = scripted({("GET", "/api/v1/jobs"): [(405, b"")]})
        error = failure(self, client.jobs())
        self.assertEqual(error.status, 405)
        self.assertEqual(str(error), "HTTP 405 with no body from GET /api/v1/jobs")

    def test_requests(self) -> None:
        """Each endpoint's method, path, query and body."""
        ok = [(200, envelope({}))]
        client, agent = scripted({
            ("POST", "/api/v1/patches/apply"): [(202, envelope({"job_id": JOB}))],
            ("GET", "/api/v1/jobs?status=running&limit=5"): ok,
            ("GET", "/api/v1/packages?name=curl&upgradable=true"): ok,
            ("GET", "/api/v1/patches?security=true"): ok, ("GET", "/api/v1/system/info"): ok,
            ("GET", "/api/v1/jobs/a%2Fb"): ok, ("GET", f"/api/v1/jobs/{JOB}/events?after=3"): ok,
        })
        result(self, client.apply(dry_run=True))
        result(self, client.apply(security_only=True, packages=["curl"]))
        for call in (client.jobs(status="running", limit=5),
                     client.packages(name="curl", upgradable=True),
                     client.patches(security=True), client.info(), client.job("a/b"),
                     client.events(JOB, 3)):
            self.assertEqual(result(self, call), {})
        self.assertEqual([r[2] for r in agent.requests[:2]], [
            {"dry_run": True, "security_only": False},
            {"dry_run": False, "security_only": True, "packages": ["curl"]}])

    def test_unreachable(self) -> None:
        """No answer at all is one line naming the agent and the cause."""
        for problem, text in ((neterror.ConnectionRefusedError(), "connection refused"),
                              (neterror.DNSLookupError("x"), "the name does not resolve")):
            client = AgentClient(_Failing(problem), AgentUrl("web1", 9), clock=Clock())
            error = failure(self, client.health())
            self.assertEqual(str(error), f"cannot reach the agent at web1:9: {text}")

    def test_tls_failure(self) -> None:
        """A TLS failure (inside treq's wrapper) says so and where to look."""
        from OpenSSL import SSL
        from twisted.python.failure import Failure
        from twisted.web._newclient import ResponseNeverReceived

        wrapped = ResponseNeverReceived([Failure(SSL.Error([("SSL routines", "",
                                                              "certificate verify failed")]))])
        client = AgentClient(_Failing(wrapped), AgentUrl("web1", 9), clock=Clock())
        error = str(failure(self, client.health()))
        self.assertTrue(error.startswith("TLS handshake with web1:9 failed: "), error)
        self.assertIn("certificate verify failed", error)
        self.assertIn("--ca", error)

    def test_timeout(self) -> None:
        """An agent that never answers is given up after the timeout, on the injected clock."""
        clock = Clock()
        client = AgentClient(_Failing(None), AgentUrl("web1", 9), clock=clock, timeout=5)
        running = Deferred.fromCoroutine(client.health())
        clock.advance(4.9)
        self.assertNoResult(running)
        clock.advance(0.1)
        self.assertIn("no answer in time", str(self.failureResultOf(running, ClientError).value))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_too_large(self) -> None:
        """An answer over the size bound is refused."""
        self.patch(__import__("lpa.tools.client", fromlist=["x"]), "MAX_BODY_BYTES", 10)
        client, _ = scripted({("GET", "/api/v1/health"): [(200, envelope({"x": "y" * 20}))]})
        self.assertIn("too large", str(failure(self, client.health())))


class _Failing:
    """A treq stand-in whose requests fail with ``problem`` (or never answer when None)."""

    def __init__(self, problem: BaseException | None) -> None:
        self.problem = problem

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        return Deferred() if self.problem is None else defer.fail(self.problem)


class LoopbackTests(TestCase):
    """The real client against a real agent over mutual TLS on loopback."""

    timeout = 60

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-client-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))

    def client(self, port: int, ca: str | None = None, host: str = "localhost") -> AgentClient:
        credentials = Credentials(self.pki.good.cert, self.pki.good.key, ca or self.pki.ca_cert)
        http, pool = make_http_client(reactor, credentials, 10)
        self.addCleanup(pool.closeCachedConnections)
        return AgentClient(http, AgentUrl(host, port), clock=reactor, timeout=10)

    async def test_health_over_mtls(self) -> None:
        """The client verifies the agent, presents its certificate and reads the envelope."""
        _, port = await start_agent(self, self.pki, self.tmp)
        health = await self.client(port).health()
        self.assertEqual(health["status"], "healthy")

    async def test_follower_past_the_last_seq(self) -> None:
        """The agent's 409 EVENTS_AHEAD for a follower ahead of the job: the job detail rules."""
        from twisted.internet.task import deferLater

        from lpa.follower import JobFollower

        _, port = await start_agent(self, self.pki, self.tmp)
        client = self.client(port)
        job = (await client.apply(dry_run=True))["job_id"]
        while (await client.job(job))["status"] != "completed":
            await deferLater(reactor, 0.05, lambda: None)
        follower = JobFollower(job, after_seq=500)
        answer = await client.answer("GET", follower.poll_path())
        self.assertEqual((answer.status, answer.code), (409, protocol.EVENTS_AHEAD))
        step = follower.receive_answer(answer)
        self.assertEqual([e.status for e in step.events], ["completed"])
        self.assertTrue(follower.done)
        self.assertLess(follower.last_seq, 500)

    async def test_other_ca(self) -> None:
        """An agent signed by another CA is refused with a one-line TLS error."""
        _, port = await start_agent(self, self.pki, self.tmp)
        with self.assertRaises(ClientError) as caught:
            await self.client(port, ca=self.pki.other_ca_cert).health()
        self.assertIn(f"TLS handshake with localhost:{port} failed", str(caught.exception))

    async def test_wrong_name(self) -> None:
        """An agent whose certificate does not carry the name dialled is refused, saying TLS."""
        from tests.agentclient import mtls_client

        _, port = await start_agent(self, self.pki, self.tmp)
        http, pool = mtls_client(self.pki.client_options("good", hostname="web9.example"))
        self.addCleanup(pool.closeCachedConnections)
        client = AgentClient(http, AgentUrl("localhost", port), clock=reactor, timeout=10)
        with self.assertRaises(ClientError) as caught:
            await client.health()
        self.assertIn(f"TLS handshake with localhost:{port} failed: TLS: ", str(caught.exception))
        self.assertIn("web9.example", str(caught.exception))

    async def test_refused(self) -> None:
        """A closed port is one line naming the address."""
        _, port = await start_agent(self, self.pki, self.tmp)
        port_obj = reactor.listenTCP(0, __import__("twisted.internet.protocol",
                                                   fromlist=["Factory"]).Factory())
        closed = port_number(port_obj)
        await stop(port_obj)
        with self.assertRaises(ClientError) as caught:
            await self.client(closed).health()
        self.assertEqual(str(caught.exception),
                         f"cannot reach the agent at localhost:{closed}: connection refused")
        del port

    async def test_stream_subscribes(self) -> None:
        """The WebSocket opens over mTLS offering lpa.jobs.v1 and carries the job's frames."""
        _, port = await start_agent(self, self.pki, self.tmp)
        job = (await self.client(port).apply(dry_run=True))["job_id"]
        opened = await stream.open_stream(
            f"wss://localhost:{port}/api/v1/ws/jobs", reactor=reactor, clock=reactor,
            tls_options=self.pki.client_options("good"), timeout=10)
        try:
            self.assertEqual(opened.subprotocol, protocol.SUBPROTOCOL)
            self.assertTrue(opened.send(protocol.subscribe_frame(job, 0)))
            frames: list[dict[str, Any]] = []
            while not (frames and frames[-1].get("event") == "job_complete"):
                frames.append(json.loads(await opened.next_text()))
            self.assertEqual([f["event"] for f in frames[:2]], ["connected", "subscribed"])
        finally:
            await opened.close()
        self.assertFalse(opened.send({"action": "subscribe"}))
        with self.assertRaises(StreamClosed):
            await opened.next_text()

    async def test_stream_other_ca(self) -> None:
        """A WebSocket to an agent the CA does not vouch for fails its handshake, with why."""
        _, port = await start_agent(self, self.pki, self.tmp)
        options = self.pki.client_options("good", ca_cert=self.pki.other_ca_cert)
        with self.assertRaises(HandshakeFailed) as caught:
            await stream.open_stream(f"wss://localhost:{port}/api/v1/ws/jobs", reactor=reactor,
                                     clock=reactor, tls_options=options, timeout=10)
        self.assertIn("certificate verify failed", str(caught.exception))

    async def test_stream_disabled(self) -> None:
        """An agent with the WebSocket disabled answers 404: the handshake fails."""
        _, port = await start_agent(self, self.pki, self.tmp,
                                    extra="websocket:\n  enabled: false\n")
        with self.assertRaises(HandshakeFailed) as caught:
            await stream.open_stream(f"wss://localhost:{port}/api/v1/ws/jobs", reactor=reactor,
                                     clock=reactor, tls_options=self.pki.client_options("good"),
                                     timeout=10)
        self.assertIn("404", str(caught.exception))

    async def test_stream_timeout(self) -> None:
        """A peer that never answers fails the handshake after the timeout (injected clock)."""
        from twisted.internet.protocol import Factory, Protocol

        silent = listen_tcp(Factory.forProtocol(Protocol))
        self.addCleanup(silent.stopListening)
        clock = Clock()
        opening = stream.open_stream(
            f"wss://localhost:{port_number(silent)}/api/v1/ws/jobs", reactor=reactor,
            clock=clock, tls_options=self.pki.client_options("good"), timeout=3)
        clock.advance(3)
        with self.assertRaises(HandshakeFailed) as caught:
            await opening
        self.assertIn("no WebSocket handshake within 3s", str(caught.exception))

    async def test_stream_without_subprotocol(self) -> None:
        """A WebSocket server that does not select lpa.jobs.v1 is not a job stream: refused."""
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

        class Plain(WebSocketServerProtocol):
            def onConnect(self, request: Any) -> None:
                return None  # accepts, selecting no subprotocol

        factory = WebSocketServerFactory()
        factory.protocol = Plain
        port = listen_tcp(factory)
        self.addCleanup(port.stopListening)
        with self.assertRaises(HandshakeFailed) as caught:
            await stream.open_stream(f"ws://127.0.0.1:{port_number(port)}/api/v1/ws/jobs",
                                     reactor=reactor, clock=reactor, tls_options=None,
                                     timeout=10)
        self.assertIn("did not select the subprotocol lpa.jobs.v1 (selected: none)",
                      str(caught.exception))

    def test_never_without_tls(self) -> None:
        """A wss:// stream is never dialled without TLS options (it would not verify)."""
        self.assertRaises(ValueError, stream.open_stream, "wss://h:1/api/v1/ws/jobs",
                          reactor=reactor, clock=reactor, tls_options=None, timeout=1)
