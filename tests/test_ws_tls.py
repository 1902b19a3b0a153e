"""The job stream as a new user meets it: the ``websockets`` library over wss with a client cert.

Real loopback mTLS (``lpa.tls.server_tls_options`` over the test PKI of ``tests.certs``), a
twisted.web ``Site`` with ``make_ws_resource`` at ``/api/v1/ws/jobs``, the real ``JobManager``
running dry-run patch jobs on ``tests.fakes.FakeBackend`` (gated, so a job is still running
while clients subscribe).  ``websockets``' sync client runs in a worker thread while the reactor
serves; the thread releases the gate through ``blockingCallFromThread``.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from websockets.exceptions import InvalidMessage, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from lpa.agent.eventlog import EventLog
from lpa.agent.jobs import JobManager
from lpa.agent.model import JobRequest
from lpa.agent.ws import JobStreamFactory, make_ws_resource
from lpa.protocol import SUBPROTOCOL
from tests.certs import TestPki, make_test_pki
from tests.fakes import FakeBackend, FakeJobStore, FakeProcessRunner, FakeSystem
from tests.fakes_jobs import FakeJobManager, new_job
from tests.loopback import listen_ssl, port_number, stop

RECV_TIMEOUT = 10.0


def client_context(pki: TestPki, which: str | None = "good") -> ssl.SSLContext:
    """A stdlib context trusting the test CA and presenting ``which`` client certificate."""
    context = ssl.create_default_context(cafile=pki.ca_cert)
    if which is not None:
        files = pki.client(which)
        context.load_cert_chain(files.cert, files.key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def recv_json(ws: ClientConnection, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
    return frame


def recv_until(
    ws: ClientConnection, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Frames up to and including the first for which ``done`` is true."""
    frames = []
    while True:
        frame = recv_json(ws)
        frames.append(frame)
        if done(frame):
            return frames


def drain(ws: ClientConnection, quiet: float = 0.3) -> list[dict[str, Any]]:
    """Whatever arrives until the connection has been quiet for ``quiet`` seconds."""
    frames = []
    while True:
        try:
            frames.append(recv_json(ws, timeout=quiet))
        except TimeoutError:
            return frames


def job_events(frames: list[dict[str, Any]], job_id: str | None = None) -> list[dict[str, Any]]:
    return [
        f for f in frames
        if f["event"] in ("job_status", "job_complete") and job_id in (None, f["job_id"])
    ]


def is_ack(frame: dict[str, Any]) -> bool:
    return bool(frame["event"] == "subscribed")


def is_complete(job_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["event"] == "job_complete" and f["job_id"] == job_id


class WssInteropTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits for it
        self.pki = make_test_pki(self.mktemp())
        self.backend = FakeBackend()
        self.backend.script(
            "patch_apply", progress=[(10, "resolving"), (40, "simulating")], gate=True
        )
        self.manager = JobManager(
            backend=self.backend,
            system=FakeSystem(),
            runner=FakeProcessRunner(),
            store=FakeJobStore(),
            clock=reactor,
            stop_grace_seconds=1.0,
        )
        self.factory = JobStreamFactory(self.manager.events, self.manager, clock=reactor)
        root = Resource()
        api = Resource()
        v1 = Resource()
        ws = Resource()
        root.putChild(b"api", api)
        api.putChild(b"v1", v1)
        v1.putChild(b"ws", ws)
        ws.putChild(b"jobs", make_ws_resource(self.factory))
        self.port = listen_ssl(Site(root), self.pki.server_options())
        self.url = f"wss://127.0.0.1:{port_number(self.port)}/api/v1/ws/jobs"
        self.addCleanup(self._tear_down)
        return self.manager.start()

    async def _tear_down(self) -> None:
        for gate in self.backend.gates.values():
            if not gate.called:
                gate.callback(None)
        await self.manager.stop()
        await stop(self.port)
        # let the server side of closed connections finish
        for _ in range(3):
            await deferLater(reactor, 0.05, lambda: None)

    def connect(
        self, which: str | None = "good", subprotocols: list[str] | None = None
    ) -> ClientConnection:
        offered = [SUBPROTOCOL] if subprotocols is None else subprotocols
        return connect(
            self.url,
            ssl=client_context(self.pki, which),
            proxy=None,
            open_timeout=10,
            subprotocols=[Subprotocol(name) for name in offered],
        )

    def submit_patch(self) -> str:
        return self.manager.submit(JobRequest(operation="patch_apply", dry_run=True)).id

    def release(self, job_id: str) -> None:
        """Let the gated job finish (runs on the reactor thread)."""
        self.backend.gates.setdefault(job_id, Deferred()).callback(None)

    async def running(self, job_id: str) -> None:
        """Wait until the job's backend call has reached its gate."""
        for _ in range(200):
            if job_id in self.backend.gates:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"job {job_id} never reached its gate")

    async def test_done_when(self) -> None:
        """The job stream's acceptance checks: every event once in order, filtering, late and
        mid replay, garbage gets an error event and the connection keeps working."""
        job_a = self.submit_patch()
        job_b = self.submit_patch()  # queued behind A: one mutation at a time
        await self.running(job_a)

        def clients() -> dict[str, Any]:
            out: dict[str, Any] = {}
            with self.connect() as ws1, self.connect() as ws2:
                out["hello"] = recv_json(ws1)
                ws1.send(json.dumps({"action": "subscribe", "job_id": job_a, "after_seq": 0}))
                recv_until(ws1, is_ack)
                recv_json(ws2)
                ws2.send(json.dumps({"action": "subscribe", "job_id": job_b}))
                out["ack2"] = recv_json(ws2)
                blockingCallFromThread(IReactorFromThreads(reactor), self.release, job_a)
                out["stream"] = recv_until(ws1, is_complete(job_a))
                ws1.send("this is { not json")
                out["garbage"] = recv_json(ws1)
                ws1.send(json.dumps({"action": "subscribe", "job_id": job_a, "after_seq": 3}))
                out["middle"] = recv_until(ws1, is_complete(job_a))
                out["second"] = drain(ws2)
            with self.connect() as late:
                recv_json(late)
                late.send(json.dumps({"action": "subscribe", "job_id": job_a, "after_seq": 0}))
                out["late"] = recv_until(late, is_complete(job_a))
            return out

        out = await deferToThread(clients)
        kept = [e.to_wire() for e in self.manager.events.kept(job_a)]
        self.assertEqual(out["hello"]["event"], "connected")
        self.assertEqual((out["ack2"]["event"], out["ack2"]["job_id"]), ("subscribed", job_b))

        stream = job_events(out["stream"])
        seqs = [f["seq"] for f in stream]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))
        self.assertEqual(stream, kept)
        self.assertEqual([f["event"] for f in stream].count("job_complete"), 1)
        self.assertEqual(stream[-1]["event"], "job_complete")
        self.assertEqual(stream[-2]["status"], "completed")
        self.assertEqual({f["job_id"] for f in stream}, {job_a})

        self.assertEqual(
            (out["garbage"]["event"], out["garbage"]["error_code"]), ("error", "INVALID_JSON")
        )
        self.assertEqual(job_events(out["middle"]), kept[3:])
        self.assertEqual(job_events(out["late"]), kept)
        self.assertEqual(job_events(out["second"], job_a), [])

    async def test_no_client_certificate_refused(self) -> None:
        """Without a client certificate the wss handshake fails; nobody gets a session."""

        def attempt() -> Exception | None:
            try:
                with self.connect(which=None) as ws:
                    ws.recv(timeout=5)
            except Exception as e:  # the failure is the point
                return e
            return None

        subscribers = self.manager.events.subscriber_count()
        error = await deferToThread(attempt)
        self.assertIsNotNone(error)
        self.assertIsInstance(
            error,
            (InvalidMessage, ssl.SSLError, ConnectionError, EOFError, OSError, *_closed_errors()),
        )
        self.assertEqual(self.manager.events.subscriber_count(), subscribers)
        self.assertEqual(self.factory.countConnections, 0)

    async def test_no_subprotocol_refused_with_envelope(self) -> None:
        """A wss client offering no subprotocol gets HTTP 400 with the JSON envelope naming
        lpa.jobs.v1, and no session; one offering it gets it selected."""

        def attempts() -> tuple[Any, str | None]:
            try:
                with self.connect(subprotocols=[]):
                    pass
            except InvalidStatus as refused:
                answer = refused.response
            with self.connect() as ws:
                recv_json(ws)
                return answer, ws.subprotocol

        answer, selected = await deferToThread(attempts)
        self.assertEqual(answer.status_code, 400)
        self.assertEqual(answer.headers["Content-Type"], "application/json")
        body = json.loads(answer.body)
        self.assertEqual((body["success"], body["error"]["code"]), (False, "SUBPROTOCOL_REQUIRED"))
        self.assertEqual(body["error"]["details"]["subprotocol"], SUBPROTOCOL)
        self.assertEqual(selected, SUBPROTOCOL)

    async def test_finished_job_answers_at_once(self) -> None:
        """Subscribing to a finished job without after_seq gives its end at once over wss."""
        job = self.submit_patch()
        await self.running(job)
        self.release(job)
        for _ in range(200):
            if self.manager.get(job).terminal:
                break
            await deferLater(reactor, 0.01, lambda: None)

        def client() -> list[dict[str, Any]]:
            with self.connect() as ws:
                recv_json(ws)
                ws.send(json.dumps({"action": "subscribe", "job_id": job}))
                return recv_until(ws, is_complete(job))

        frames = await deferToThread(client)
        kept = [e.to_wire() for e in self.manager.events.kept(job)]
        self.assertEqual(job_events(frames), kept[-2:])


class AgentSiteTests(WssInteropTests):
    """The same stream through the agent's real Klein site (``AgentApi``), next to its REST twin."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits for it
        started = super().setUp()
        from lpa.agent.http.api import AgentApi

        api = AgentApi(
            jobs=self.manager,
            backend=self.backend,
            system=FakeSystem(),
            clock=reactor,
            version="test",
            rate_limiter=None,
            ws_resource=make_ws_resource(self.factory),
        )
        self.port.stopListening()  # replaced by the agent's site
        self.port = listen_ssl(Site(api.resource()), self.pki.server_options())
        self.base = f"127.0.0.1:{port_number(self.port)}"
        self.url = f"wss://{self.base}/api/v1/ws/jobs"
        return started

    def rest(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET over the same mTLS port (blocking; call from a thread)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(
                f"https://{self.base}{path}", context=client_context(self.pki), timeout=10
            ) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    async def test_rest_twin_returns_the_same_events(self) -> None:
        """``GET /api/v1/jobs/{id}/events?after=0`` answers exactly what the WebSocket sent."""
        job = self.submit_patch()
        await self.running(job)

        def client() -> tuple[list[dict[str, Any]], Any]:
            with self.connect() as ws:
                recv_json(ws)
                ws.send(json.dumps({"action": "subscribe", "job_id": job, "after_seq": 0}))
                recv_until(ws, is_ack)
                blockingCallFromThread(IReactorFromThreads(reactor), self.release, job)
                frames = recv_until(ws, is_complete(job))
            return frames, self.rest(f"/api/v1/jobs/{job}/events?after=0")

        frames, (status, body) = await deferToThread(client)
        self.assertEqual(status, 200)
        self.assertEqual(body["data"]["events"], job_events(frames))

    async def test_plain_get_is_426(self) -> None:
        """A GET without the upgrade on the agent's site answers 426, and the site still serves."""
        status, _body = await deferToThread(self.rest, "/api/v1/ws/jobs")
        self.assertEqual(status, 426)


class _PausableClient(WebSocketClientProtocol):
    """Counts messages; fires ``opened``/``closed`` Deferreds for the test to await."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self.received = 0

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received += 1

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(reason))
        self.closed.callback((wasClean, code, reason))


class _RecordingClientFactory(WebSocketClientFactory):
    """Builds _PausableClients offering our subprotocol, and keeps each one."""

    def __init__(self, url: str) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL])
        self.protocol = _PausableClient
        self.built: list[_PausableClient] = []

    def buildProtocol(self, addr: Any) -> _PausableClient:
        protocol = super().buildProtocol(addr)
        assert isinstance(protocol, _PausableClient), protocol
        self.built.append(protocol)
        return protocol


class _Reading(Protocol):
    """A client's TLS transport, as the producer of what the client reads."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


def reading(client: WebSocketClientProtocol) -> _Reading:
    """What stops and restarts ``client``'s reading (its TLS transport)."""
    return cast(_Reading, client.transport)


class SlowConsumerOverTlsTests(TestCase):
    timeout = 60

    async def overflow(
        self, close_handshake_timeout: float | None = None, **factory_options: Any
    ) -> tuple[_PausableClient, JobStreamFactory, EventLog, int]:
        """Connect over mTLS, subscribe to all, stop reading, append events until the server
        closes the connection as a slow consumer; return the client, factory, log, count."""
        pki = make_test_pki(self.mktemp())
        events = EventLog(reactor)
        jobs = FakeJobManager(reactor, events=events)
        factory = JobStreamFactory(
            events, jobs, clock=reactor, send_buffer_events=50, **factory_options
        )
        if close_handshake_timeout is not None:
            factory.setProtocolOptions(closeHandshakeTimeout=close_handshake_timeout)
        port = listen_ssl(Site(echo_free_root(factory)), pki.server_options())
        self.addCleanup(port.stopListening)
        url = f"wss://localhost:{port_number(port)}/api/v1/ws/jobs"
        client_factory = _RecordingClientFactory(url)
        client_factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=10)
        protocols = client_factory.built
        connector = connectWS(client_factory, contextFactory=pki.client_options("good"))
        self.addCleanup(connector.disconnect)
        for _ in range(500):
            if protocols:
                break
            await deferLater(reactor, 0.01, lambda: None)
        client = protocols[0]
        await client.opened
        self.assertEqual(events.subscriber_count(), 1)
        client.sendMessage(b'{"action": "subscribe"}')
        while client.received < 2:  # connected, subscribed
            await deferLater(reactor, 0.01, lambda: None)

        reading(client).pauseProducing()  # stop reading: the server's buffers fill up
        job = new_job(jobs)
        line = "x" * 8000
        appended = 0
        while events.subscriber_count() and appended < 5000:
            for _ in range(20):
                jobs.step(job, "running", 50, line)
                appended += 1
            await deferLater(reactor, 0.001, lambda: None)
        self.assertEqual(events.subscriber_count(), 0, f"not closed after {appended} events")
        self.assertEqual(events.last_seq(job), appended + 1)
        self.addCleanup(_settle)
        return client, factory, events, appended

    async def test_unread_connection_closed_1008_engine_unaffected(self) -> None:
        """A client that stops reading over mTLS is closed with 1008 once its queue is full;
        events keep being appended meanwhile (the engine is never held back)."""
        client, _factory, _events, appended = await self.overflow()
        reading(client).resumeProducing()
        _was_clean, code, reason = await client.closed
        self.assertEqual(code, 1008)
        self.assertIn("slow consumer", reason)
        self.assertLess(client.received, appended + 2)

    async def test_slow_reader_gets_close_frame_after_handshake_timeout(self) -> None:
        """A client that reads again only after the closing-handshake timeout has passed still
        reads every buffered frame, then the 1008 close frame and its reason (Autobahn's own
        timers used to abort the connection with a reset, which discarded the close frame)."""
        # Autobahn's closing-handshake timer made short: it must not matter
        client, _factory, _events, _appended = await self.overflow(close_handshake_timeout=0.2)
        await deferLater(reactor, 1.0, lambda: None)  # well past 0.2 s, still unread
        reading(client).resumeProducing()
        wasClean, code, reason = await client.closed
        self.assertEqual((wasClean, code), (True, 1008))
        self.assertIn("slow consumer", reason)
        self.assertIn("after_seq", reason)
        self.assertGreater(client.received, 2)

    async def test_client_that_never_reads_is_torn_down(self) -> None:
        """A client that never reads again loses its TCP connection after drain_timeout: the
        server holds no socket for it."""
        client, factory, _events, _appended = await self.overflow(drain_timeout=0.5)
        self.assertEqual(factory.countConnections, 1)
        for _ in range(500):
            if factory.countConnections == 0:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(factory.countConnections, 0)
        reading(client).resumeProducing()
        wasClean, _code, _reason = await client.closed
        self.assertFalse(wasClean)


async def _settle() -> None:
    for _ in range(3):
        await deferLater(reactor, 0.05, lambda: None)


def echo_free_root(factory: JobStreamFactory) -> Resource:
    """``/api/v1/ws/jobs`` served by the agent's resource."""
    root = Resource()
    node = root
    for segment in (b"api", b"v1", b"ws"):
        child = Resource()
        node.putChild(segment, child)
        node = child
    node.putChild(b"jobs", make_ws_resource(factory))
    return root


def _closed_errors() -> tuple[type[BaseException], ...]:
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    return (ConnectionClosed, InvalidHandshake)
