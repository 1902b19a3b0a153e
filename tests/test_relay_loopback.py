"""The relay against test agents over loopback mTLS: stream, stub fallback, h2, restart."""

from __future__ import annotations

import tempfile
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from lpa import events as ev
from lpa.relay.config import RelayConfig
from lpa.relay.interfaces import AgentAddress
from lpa.relay.machine import POLLING, STREAMING
from lpa.relay.service import make_relay_service
from lpa.tls import negotiated_protocol
from tests.certs import make_test_pki
from tests.fakeagents import H2_FIRST, LpaTestAgent, StubHandshakeAgent, h2_preferring_options
from tests.fakes_relay import FakeRelayStore

_pki = None


def pki() -> Any:
    global _pki
    if _pki is None:
        _pki = make_test_pki(tempfile.mkdtemp(prefix="lpa-relay-pki-"))
    return _pki


async def until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait on the real reactor until ``predicate()`` holds (loopback tests only)."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await deferLater(reactor, 0.02, lambda: None)


class LoopbackTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.store = FakeRelayStore()
        self.agents: list[Any] = []

    def start_agent(self, agent: Any, options: Any = None, alpn: Any = None) -> AgentAddress:
        agent.listen(options or pki().server_options(crl_path=None), alpn)
        self.agents.append(agent)
        self.addCleanup(agent.kill)
        return AgentAddress("localhost", agent.port_number)

    def start_relay(self, **overrides: Any) -> Any:
        settings = dict(
            database_url="postgres://unused@localhost/db",
            scan_interval=0.2,
            poll_interval=0.2,
            handshake_timeout=5.0,
            reconnect_initial_delay=0.1,
            reconnect_max_delay=0.4,
            unreachable_deadline=60.0,
        )
        settings.update(overrides)
        service = make_relay_service(
            RelayConfig(**settings),
            reactor=reactor,
            store=self.store,
            tls_options_for=lambda host: pki().client_options("good", host),
        )
        service.startService()

        async def stop() -> None:
            await service.stopService()
            await deferLater(reactor, 0.1, lambda: None)  # let the server side finish closing

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return service

    def link_state(self, service: Any, address: AgentAddress) -> str | None:
        link = service.scanner.links.get(address)
        return link.state if link is not None else None

    def applied(self, row_id: str) -> list[tuple[list[int | None], str]]:
        return [
            ([e.seq for e in c.events], c.transport)
            for c in self.store.calls
            if c.method == "apply_events" and c.host_job.row_id == row_id
        ]

    async def test_streams_from_last_seq_and_routes_by_job(self) -> None:
        """Over mTLS + http/1.1 it subscribes from last_seq; only its job's events reach a row."""
        agent = LpaTestAgent(reactor)
        address = self.start_agent(agent)
        mine, other = agent.add_job(), agent.add_job()
        agent.emit(mine, ev.PENDING, "Job created")
        agent.emit(mine, ev.RUNNING, "Job started")
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=mine, agent=address, last_seq=1
        )
        service = self.start_relay()
        await until(lambda: self.link_state(service, address) == STREAMING, "streaming")
        await until(lambda: self.store.rows["r1"].last_seq == 2, "replay of seq 2")
        agent.emit(other, ev.COMPLETED, "another job ended")
        agent.emit(mine, ev.RUNNING, "Reading package lists", kind=ev.KIND_OUTPUT)
        agent.finish(mine)
        await until(lambda: self.store.rows["r1"].status == "succeeded", "row succeeded")
        seqs = [seq for batch, _ in self.applied("r1") for seq in batch]
        self.assertIn(seqs, ([2, 3, 4], [2, 3, 4, 5]))  # 5 = job_complete, when batched with 4
        self.assertEqual({transport for _, transport in self.applied("r1")}, {"ws"})
        self.assertEqual(self.store.rows["r1"].output, "Reading package lists")
        self.assertIn({"action": "subscribe", "job_id": mine, "after_seq": 1}, agent.ws_messages)
        self.assertEqual(agent.negotiated, ["http/1.1"])
        self.assertEqual(self.store.job_status["j1"], "succeeded")
        await until(
            lambda: {"action": "unsubscribe", "job_id": mine} in agent.ws_messages, "unsubscribe"
        )

    async def test_stub_handshake_falls_back_to_detail_polling(self) -> None:
        """The original's 101 without accept key fails; the job is polled via GET /jobs/{id}."""
        agent = StubHandshakeAgent(reactor)
        address = self.start_agent(agent)
        job = agent.add_job(status="running")
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=job, agent=address
        )
        service = self.start_relay()
        await until(lambda: self.link_state(service, address) == POLLING, "polling")
        await until(lambda: f"/api/v1/jobs/{job}" in agent.requests, "detail poll")
        self.assertIn(f"/api/v1/jobs/{job}/events?after=0", agent.requests)
        big = ["x" * 1000 for _ in range(100)]
        agent.set_state(job, "completed", logs=big)
        await until(lambda: self.store.rows["r1"].status == "succeeded", "row succeeded")
        self.assertEqual(self.store.rows["r1"].output, "\n".join(big))
        self.assertEqual({transport for _, transport in self.applied("r1")}, {"poll"})
        self.assertEqual(self.store.notifications[-1]["event_type"], "job")

    async def test_h2_preferring_server_gets_http11(self) -> None:
        """Against a server offering h2 first, the relay negotiates http/1.1 and streams."""
        agent = LpaTestAgent(reactor)
        address = self.start_agent(agent, h2_preferring_options(pki()), H2_FIRST)
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=job, agent=address
        )
        service = self.start_relay()
        await until(lambda: self.store.rows["r1"].last_seq == 1, "event applied")
        self.assertEqual(self.link_state(service, address), STREAMING)
        self.assertEqual(agent.negotiated, ["http/1.1"])

    async def test_h2_preferring_server_does_give_h2_to_whoever_offers_it(self) -> None:
        """Control for the test above: a client offering h2 first does get h2 from that server."""
        agent = LpaTestAgent(reactor)
        address = self.start_agent(agent, h2_preferring_options(pki()), H2_FIRST)
        got: Deferred = Deferred()

        class Probe(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

            def dataReceived(self, data: bytes) -> None:
                if not got.called:
                    got.callback(negotiated_protocol(self.transport))
                self.transport.loseConnection()

            def connectionLost(self, reason: Any) -> None:
                if not got.called:
                    got.callback(negotiated_protocol(self.transport))

        options = pki().client_options("good", "localhost", acceptable_protocols=H2_FIRST)
        reactor.connectSSL("127.0.0.1", address.port, ClientFactory.forProtocol(Probe), options)
        self.assertEqual(await got, b"h2")
        await deferLater(reactor, 0.1, lambda: None)
        # without Twisted's HTTP/2 (the `priority` package) the server cannot speak what it chose
        self.flushLoggedErrors(ValueError)

    async def test_websocket_disabled_polls_events_endpoint(self) -> None:
        """An agent with the WebSocket off (404) is polled through the events endpoint."""
        agent = LpaTestAgent(reactor, websocket=False)
        address = self.start_agent(agent)
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=job, agent=address
        )
        service = self.start_relay()
        await until(lambda: self.store.rows["r1"].last_seq == 1, "first event")
        self.assertEqual(self.link_state(service, address), POLLING)
        agent.finish(job, ev.FAILED, error="apt exploded")
        await until(lambda: self.store.rows["r1"].status == "failed", "row failed")
        self.assertEqual(self.store.rows["r1"].error_message, "apt exploded")
        self.assertIn([s for batch, _ in self.applied("r1") for s in batch], ([1, 2], [1, 2, 3]))
        self.assertNotIn(f"/api/v1/jobs/{job}", agent.requests)

    async def test_agent_restart_resumes_without_loss_or_duplicate(self) -> None:
        """Agent killed mid-job: events made while down arrive later, once each, in order."""
        agent = LpaTestAgent(reactor)
        address = self.start_agent(agent)
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=job, agent=address
        )
        service = self.start_relay()
        await until(lambda: self.store.rows["r1"].last_seq == 1, "first event")
        await agent.kill()
        for line in range(5):
            agent.emit(job, ev.RUNNING, f"line {line}", kind=ev.KIND_OUTPUT)
        await until(lambda: self.link_state(service, address) == POLLING, "polling while down")
        agent.listen(pki().server_options(crl_path=None))
        agent.finish(job)
        await until(lambda: self.store.rows["r1"].status == "succeeded", "row succeeded")
        await until(
            lambda: self.link_state(service, address) is None, "link gone with its last job"
        )
        seqs = [s for batch, _ in self.applied("r1") for s in batch]
        # 7 is the terminal job_status; 8 (job_complete) is only sent on when it shared 7's batch
        self.assertIn(seqs, (list(range(1, 8)), list(range(1, 9))))
        self.assertEqual(self.store.rows["r1"].output, "\n".join(f"line {n}" for n in range(5)))

    async def test_tls_name_mismatch_reports_real_cause(self) -> None:
        """A certificate for another name fails; the TLS cause is reported; then polling."""
        agent = LpaTestAgent(reactor)
        address = self.start_agent(agent)
        job = agent.add_job()
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=job, agent=address
        )
        service = make_relay_service(
            RelayConfig(
                database_url="postgres://unused@localhost/db",
                scan_interval=0.2,
                poll_interval=0.2,
                reconnect_initial_delay=0.2,
                reconnect_max_delay=0.4,
            ),
            reactor=reactor,
            store=self.store,
            tls_options_for=lambda host: pki().client_options("good", "wrong.example"),
        )
        service.startService()
        self.addCleanup(
            lambda: service.stopService().addCallback(
                lambda _: deferLater(reactor, 0.1, lambda: None)
            )
        )
        await until(lambda: self.link_state(service, address) == POLLING, "polling")
        reason = service.scanner.links[address].last_failure
        self.assertRegex(reason, "(?i)verif|certificate|mismatch|wrong.example")
        self.assertEqual(agent.ws_messages, [])

    async def test_back_to_websocket_when_it_opens(self) -> None:
        """Polling while the WebSocket is refused; once it opens, the link streams, no polls."""
        agent = LpaTestAgent(reactor, websocket=False)
        address = self.start_agent(agent)
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=job, agent=address
        )
        service = self.start_relay()
        await until(lambda: self.store.rows["r1"].last_seq == 1, "first event polled")
        self.assertEqual(self.link_state(service, address), POLLING)
        agent.websocket = True
        await until(lambda: self.link_state(service, address) == STREAMING, "streaming")
        subscribe = {"action": "subscribe", "job_id": job, "after_seq": 1}
        await until(lambda: subscribe in agent.ws_messages, "subscribe after seq 1")
        await deferLater(reactor, 0.1, lambda: None)  # a poll sent before the switch lands
        polls = len([r for r in agent.requests if "/events" in r])
        agent.emit(job, ev.RUNNING, "line", kind=ev.KIND_OUTPUT)
        await until(lambda: self.store.rows["r1"].last_seq == 2, "streamed event")
        await deferLater(reactor, 0.5, lambda: None)  # more than two poll intervals
        self.assertEqual(len([r for r in agent.requests if "/events" in r]), polls)
        self.assertEqual(self.applied("r1"), [([1], "poll"), ([2], "ws")])

    async def test_silent_agent_times_out_the_handshake(self) -> None:
        """An agent that accepts TCP but never answers TLS is given up after handshake_timeout."""
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        address = AgentAddress("localhost", silent.getHost().port)
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id="a1", agent=address
        )
        service = self.start_relay(
            handshake_timeout=0.5, reconnect_initial_delay=5.0, reconnect_max_delay=5.0
        )
        started = reactor.seconds()
        await until(lambda: self.link_state(service, address) == POLLING, "polling")
        self.assertLess(reactor.seconds() - started, 5)
        self.assertIn("timed out after 0.5s", service.scanner.links[address].last_failure)
