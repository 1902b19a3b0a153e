"""The relay's TLS handshake with test agents over real loopback mTLS: http/1.1 and the
subprotocol negotiated, h2 refused and reported, a host name mismatch and a refused client
certificate reported with their real cause.  Everything past the handshake (fallbacks,
restarts, handover) runs in memory on a Clock in ``test_relay_memory``."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorSSL
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lpa import events as ev
from lpa.relay.config import RelayConfig
from lpa.relay.interfaces import AgentAddress
from lpa.relay.machine import POLLING, STREAMING
from lpa.relay.service import make_relay_service
from lpa.tls import negotiated_protocol
from tests.certs import make_test_pki
from tests.fakeagents import H2_FIRST, LpaTestAgent, h2_preferring_options
from tests.fakes_relay import FakeRelayStore


@functools.cache
def pki() -> Any:
    """One test PKI for the module, made on first use."""
    return make_test_pki(tempfile.mkdtemp(prefix="lpa-relay-pki-"))


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

    def start_relay(self, tls_options_for: Any = None, **overrides: Any) -> Any:
        settings: dict[str, Any] = {
            "database_url": "postgres://unused@localhost/db",
            "scan_interval": 0.2,
            "poll_interval": 0.2,
            "handshake_timeout": 5.0,
            "reconnect_initial_delay": 0.1,
            "reconnect_max_delay": 0.4,
            "unreachable_deadline": 60.0,
        }
        settings.update(overrides)
        service = make_relay_service(
            RelayConfig(**settings),
            reactor=reactor,
            store=self.store,
            tls_options_for=tls_options_for or (lambda host: pki().client_options("good", host)),
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

    def applied(self, row_id: str) -> list[tuple[list[int | None], str | None]]:
        return [
            ([e.seq for e in c.events], c.transport)
            for c in self.store.calls
            if c.method == "apply_events"
            and c.host_job is not None
            and c.host_job.row_id == row_id
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
        self.assertEqual(agent.offered, [["lpa.jobs.v1"]])

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
        got: Deferred[bytes | None] = Deferred()

        class Probe(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

            def dataReceived(self, data: bytes) -> None:
                if not got.called:
                    got.callback(negotiated_protocol(self.transport))
                assert self.transport is not None
                self.transport.loseConnection()

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                if not got.called:
                    got.callback(negotiated_protocol(self.transport))

        options = pki().client_options("good", "localhost", acceptable_protocols=H2_FIRST)
        # forProtocol is typed as returning a Factory whatever class it is called on
        factory = cast(ClientFactory, ClientFactory.forProtocol(Probe))
        IReactorSSL(reactor).connectSSL(
            "127.0.0.1", address.port, factory, options, timeout=30, bindAddress=None
        )
        self.assertEqual(await got, b"h2")
        await deferLater(reactor, 0.1, lambda: None)
        # without Twisted's HTTP/2 (the `priority` package) the server cannot speak what it chose
        self.flushLoggedErrors(ValueError)

    async def test_tls_name_mismatch_reports_real_cause(self) -> None:
        """A certificate for another name fails; the line leads with the TLS cause; polling."""
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
        self.assertTrue(
            reason.startswith("TLS: the agent's certificate is not valid for 'wrong.example'"),
            reason,
        )
        self.assertNotIn("peer dropped", reason)
        self.assertEqual(agent.ws_messages, [])

    async def test_agent_that_picks_h2_is_reported_as_such(self) -> None:
        """A relay offering h2 to an h2-first agent: the failure says h2, not ConnectionLost."""
        agent = LpaTestAgent(reactor)
        address = self.start_agent(agent, h2_preferring_options(pki()), H2_FIRST)
        job = agent.add_job()
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=job, agent=address
        )
        service = self.start_relay(
            tls_options_for=lambda host: pki().client_options(
                "good", host, acceptable_protocols=H2_FIRST
            )
        )
        await until(lambda: self.link_state(service, address) == POLLING, "polling")
        reason = service.scanner.links[address].last_failure
        self.assertTrue(reason.startswith("the agent chose HTTP/2 (ALPN h2)"), reason)
        self.assertNotIn("ConnectionLost", reason)
        # the test agent's Site cannot speak the h2 it chose (no HTTP/2 support installed)
        self.flushLoggedErrors(ValueError)

    async def test_agent_refusing_our_certificate_says_so(self) -> None:
        """A client certificate from another CA: the TLS alert and what it means lead the line."""
        agent = LpaTestAgent(reactor)
        address = self.start_agent(agent)
        job = agent.add_job()
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=job, agent=address
        )
        service = self.start_relay(
            tls_options_for=lambda host: pki().client_options("other_ca", host)
        )
        await until(lambda: self.link_state(service, address) == POLLING, "polling")
        reason = service.scanner.links[address].last_failure
        self.assertTrue(reason.startswith("TLS handshake failed: "), reason)
        self.assertIn("unknown ca", reason)

