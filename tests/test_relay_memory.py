"""The whole relay against test agents in memory, on a Clock: streaming, fallbacks, restarts,
handover between relays and self-fencing.  No sockets, no sleeping; every test ends with no
delayed call left.  (The TLS handshake itself is tested over real loopback in
``test_relay_loopback``.)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import psycopg2
from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from txaio.testutil import replace_loop

from lpa import events as ev
from lpa.relay.backoff import HandshakeGate
from lpa.relay.config import RelayConfig
from lpa.relay.interfaces import AgentAddress
from lpa.relay.machine import POLLING, STREAMING
from lpa.relay.service import RelayService, make_relay_service
from lpa.relay.ws_client import WebSocketDialer
from tests.fakeagents import LpaTestAgent, StubHandshakeAgent
from tests.fakes_membership import FakeMembershipDatabase
from tests.fakes_relay import FakeRelayStore
from tests.memnet import MemoryNetwork

ADDRESS = AgentAddress("agent1.example", 12443)


class RoutedHttp:
    """A treq-like client: each ``https://host:port/…`` GET goes to that agent's resource."""

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network
        self.stubs: dict[tuple[str, int], StubTreq] = {}
        network.flushers.append(self.flush)

    def add(self, address: AgentAddress, resource: Any) -> None:
        self.stubs[(address.host, address.port)] = StubTreq(resource)

    def remove(self, address: AgentAddress) -> None:
        self.stubs.pop((address.host, address.port), None)

    def get(self, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        parts = urlsplit(url)
        stub = self.stubs.get((parts.hostname or "", parts.port or 443))
        if stub is None:
            return defer.fail(error.ConnectionRefusedError("agent is down"))
        # StubTreq binds treq's functions to its in-memory agent at run time: typed as Any
        client: Any = stub
        response: defer.Deferred[Any] = client.get(url, **kwargs)
        return response

    def flush(self) -> None:
        for stub in list(self.stubs.values()):
            stub.flush()


class MemoryRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.network = MemoryNetwork()
        loop = replace_loop(self.network)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        self.store = FakeRelayStore()
        self.http = RoutedHttp(self.network)
        self.relays: list[RelayService] = []
        self.agents: dict[AgentAddress, Any] = {}
        self.addCleanup(self.nothing_left)

    def nothing_left(self) -> None:
        """Stop every relay, take the agents down, let time pass: no delayed call is left."""
        stopping = [relay.stopService() for relay in self.relays if relay.running]
        self.network.run(6)
        for stopped in stopping:
            self.successResultOf(stopped)
        for address in list(self.agents):
            self.network.kill(address.host, address.port)
        self.network.run(60, step=1)
        self.assertEqual(self.network.getDelayedCalls(), [])

    def agent(self, agent: Any, address: AgentAddress = ADDRESS) -> Any:
        """Serve ``agent`` (WebSocket and REST) at ``address``."""
        resource = agent._resource()
        self.network.listen(
            address.host, address.port, Site(resource, reactor=self.network, timeout=None)
        )
        self.http.add(address, resource)
        self.agents[address] = agent
        return agent

    def kill(self, address: AgentAddress = ADDRESS) -> None:
        self.network.kill(address.host, address.port)
        self.http.remove(address)

    def relay(self, membership: FakeMembershipDatabase | None = None, **overrides: Any) -> Any:
        settings: dict[str, Any] = {
            "database_url": "postgres://unused@localhost/db",
            "scan_interval": 1.0,
            "poll_interval": 1.0,
            "handshake_timeout": 5.0,
            "reconnect_initial_delay": 1.0,
            "reconnect_max_delay": 4.0,
            "unreachable_deadline": 600.0,
        }
        settings.update(overrides)
        config = RelayConfig(**settings)
        dial = WebSocketDialer(
            reactor=self.network,
            clock=self.network,
            tls_options_for=lambda host: "tls",
            gate=HandshakeGate(config.max_handshakes_in_flight),
            handshake_timeout=config.handshake_timeout,
            initial_delay=config.reconnect_initial_delay,
            max_delay=config.reconnect_max_delay,
            jitter=0,
            negotiated_protocol=lambda transport: "http/1.1",
        )
        service = make_relay_service(
            config,
            reactor=self.network,
            clock=self.network,
            store=self.store,
            tls_options_for=lambda host: "tls",
            http_client=self.http,
            dial=dial,
            jitter=lambda: 1.0,
            membership_database=membership,
        )
        service.startService()
        self.relays.append(service)
        self.network.flush()
        return service

    def state(self, service: Any, address: AgentAddress = ADDRESS) -> str | None:
        link = service.scanner.links.get(address)
        return link.state if link is not None else None

    def applied(self, row_id: str = "r1") -> list[tuple[list[int | None], str | None]]:
        return [
            ([e.seq for e in c.events], c.transport)
            for c in self.store.calls
            if c.method == "apply_events"
            and c.host_job is not None
            and c.host_job.row_id == row_id
        ]

    def seqs(self, row_id: str = "r1") -> list[int | None]:
        return [seq for batch, _ in self.applied(row_id) for seq in batch]

    def row(self, agent_job_id: str, last_seq: int = 0) -> None:
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=agent_job_id, agent=ADDRESS,
            last_seq=last_seq,
        )

    # -- streaming and fallbacks -----------------------------------------------------------

    def test_streams_from_last_seq_and_routes_by_job(self) -> None:
        """It subscribes from last_seq; only its job's events reach the row; then unsubscribes."""
        agent = self.agent(LpaTestAgent(self.network))
        mine, other = agent.add_job(), agent.add_job()
        agent.emit(mine, ev.PENDING, "Job created")
        agent.emit(mine, ev.RUNNING, "Job started")
        self.row(mine, last_seq=1)
        service = self.relay()
        self.assertEqual(self.state(service), STREAMING)
        self.assertEqual(self.store.rows["r1"].last_seq, 2)
        agent.emit(other, ev.COMPLETED, "another job ended")
        agent.emit(mine, ev.RUNNING, "Reading package lists", kind=ev.KIND_OUTPUT)
        agent.finish(mine)
        self.network.flush()
        self.assertEqual(self.store.rows["r1"].status, "succeeded")
        self.assertIn(self.seqs(), ([2, 3, 4], [2, 3, 4, 5]))
        self.assertEqual({transport for _, transport in self.applied()}, {"ws"})
        self.assertEqual(self.store.rows["r1"].output, "Reading package lists")
        self.assertIn({"action": "subscribe", "job_id": mine, "after_seq": 1}, agent.ws_messages)
        self.assertIn({"action": "unsubscribe", "job_id": mine}, agent.ws_messages)
        self.assertEqual(self.store.job_status["j1"], "succeeded")
        self.assertEqual(agent.offered, [["lpa.jobs.v1"]])

    def test_stub_handshake_falls_back_to_detail_polling(self) -> None:
        """The original's 101 without accept key fails; the job is polled via GET /jobs/{id}."""
        agent = self.agent(StubHandshakeAgent(self.network))
        job = agent.add_job(status="running")
        self.row(job)
        service = self.relay()
        self.network.run(1)
        self.assertEqual(self.state(service), POLLING)
        self.assertIn(f"/api/v1/jobs/{job}/events?after=0", agent.requests)
        self.assertIn(f"/api/v1/jobs/{job}", agent.requests)
        big = ["x" * 1000 for _ in range(100)]
        agent.set_state(job, "completed", logs=big)
        self.network.run(2)
        self.assertEqual(self.store.rows["r1"].status, "succeeded")
        self.assertEqual(self.store.rows["r1"].output, "\n".join(big))
        self.assertEqual({transport for _, transport in self.applied()}, {"poll"})
        self.assertEqual(self.store.notifications[-1]["event_type"], "job")

    def test_websocket_disabled_polls_events_endpoint(self) -> None:
        """An agent with the WebSocket off (404) is polled through the events endpoint."""
        agent = self.agent(LpaTestAgent(self.network, websocket=False))
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        self.row(job)
        service = self.relay()
        self.assertEqual(self.store.rows["r1"].last_seq, 1)
        self.assertEqual(self.state(service), POLLING)
        reason = service.scanner.links[ADDRESS].last_failure
        self.assertTrue(reason.startswith("WebSocket connection upgrade failed [404]"), reason)
        agent.finish(job, ev.FAILED, error="apt exploded")
        self.network.run(2)
        self.assertEqual(self.store.rows["r1"].status, "failed")
        self.assertEqual(self.store.rows["r1"].error_message, "apt exploded")
        self.assertIn(self.seqs(), ([1, 2], [1, 2, 3]))
        self.assertNotIn(f"/api/v1/jobs/{job}", agent.requests)

    def test_agent_without_the_subprotocol_is_polled(self) -> None:
        """An agent that does not select lpa.jobs.v1 is polled; the reason says why."""
        agent = self.agent(LpaTestAgent(self.network, subprotocol=False))
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        self.row(job)
        service = self.relay()
        self.assertEqual(self.state(service), POLLING)
        self.assertIn("lpa.jobs.v1", service.scanner.links[ADDRESS].last_failure)
        self.assertEqual(self.applied(), [([1], "poll")])

    def test_agent_restart_resumes_without_loss_or_duplicate(self) -> None:
        """Agent killed mid-job: events made while down arrive later, once each, in order."""
        agent = self.agent(LpaTestAgent(self.network))
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        self.row(job)
        service = self.relay()
        self.assertEqual(self.store.rows["r1"].last_seq, 1)
        self.kill()
        for line in range(5):
            agent.emit(job, ev.RUNNING, f"line {line}", kind=ev.KIND_OUTPUT)
        self.network.run(2)
        self.assertEqual(self.state(service), POLLING)
        self.agent(agent)
        agent.finish(job)
        self.network.run(6)
        self.assertEqual(self.store.rows["r1"].status, "succeeded")
        self.assertIsNone(self.state(service))  # the link went with its last job
        self.assertIn(self.seqs(), (list(range(1, 8)), list(range(1, 9))))
        self.assertEqual(self.store.rows["r1"].output, "\n".join(f"line {n}" for n in range(5)))

    def test_back_to_websocket_when_it_opens(self) -> None:
        """Polling while the WebSocket is refused; once it opens, the link streams and stops
        polling (shown by letting several poll intervals pass)."""
        agent = self.agent(LpaTestAgent(self.network, websocket=False))
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        self.row(job)
        service = self.relay()
        self.assertEqual((self.state(service), self.applied()), (POLLING, [([1], "poll")]))
        agent.websocket = True
        self.network.run(2)
        self.assertEqual(self.state(service), STREAMING)
        self.assertIn({"action": "subscribe", "job_id": job, "after_seq": 1}, agent.ws_messages)
        polls = len([r for r in agent.requests if "/events" in r])
        agent.emit(job, ev.RUNNING, "line", kind=ev.KIND_OUTPUT)
        self.network.run(5)  # five poll intervals
        self.assertEqual(len([r for r in agent.requests if "/events" in r]), polls)
        self.assertEqual(self.applied(), [([1], "poll"), ([2], "ws")])

    def test_silent_agent_times_out_the_handshake(self) -> None:
        """An agent that accepts TCP but never answers is given up after handshake_timeout."""
        self.network.silent.add((ADDRESS.host, ADDRESS.port))
        self.row("a1")
        service = self.relay(handshake_timeout=0.5, reconnect_initial_delay=4.0)
        self.network.run(0.5)
        self.assertEqual(self.state(service), POLLING)
        self.assertEqual(
            service.scanner.links[ADDRESS].last_failure, "connection timed out after 0.5s"
        )
        self.network.silent.clear()

    # -- relays sharing the fleet ------------------------------------------------------------

    def test_handover_between_relays_loses_and_doubles_nothing(self) -> None:
        """Relay A hands the agent to relay B mid-job: A's socket closes, B resumes from the
        row's seq; every event is applied once, in order."""
        agent = self.agent(LpaTestAgent(self.network))
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        self.row(job)
        db_a, db_b = FakeMembershipDatabase(), FakeMembershipDatabase()
        db_a.owned = frozenset({ADDRESS})
        relay_a = self.relay(db_a, relay_id="a")
        relay_b = self.relay(db_b, relay_id="b")
        self.assertEqual((self.state(relay_a), self.state(relay_b)), (STREAMING, None))
        agent.emit(job, ev.RUNNING, "line 1", kind=ev.KIND_OUTPUT)
        self.network.flush()
        db_a.owned, db_b.owned = frozenset(), frozenset({ADDRESS})
        self.network.run(2)  # one heartbeat each
        self.assertEqual((self.state(relay_a), self.state(relay_b)), (None, STREAMING))
        self.assertEqual(len(agent.sockets), 1)
        agent.emit(job, ev.RUNNING, "line 2", kind=ev.KIND_OUTPUT)
        agent.finish(job)
        self.network.flush()
        self.assertEqual(self.store.rows["r1"].status, "succeeded")
        self.assertEqual(self.store.rows["r1"].output, "line 1\nline 2")
        self.assertIn(self.seqs(), ([1, 2, 3, 4], [1, 2, 3, 4, 5]))
        subscribes = [m["after_seq"] for m in agent.ws_messages if m.get("action") == "subscribe"]
        self.assertEqual(subscribes, [0, 2])
        self.assertEqual(len([n for n in self.store.notifications if n["event_type"] == "job"]), 1)

    def test_relay_without_its_database_stops_following(self) -> None:
        """Heartbeats failing: the relay closes its socket before its lease can expire."""
        agent = self.agent(LpaTestAgent(self.network))
        job = agent.add_job()
        self.row(job)
        db = FakeMembershipDatabase()
        db.owned = frozenset({ADDRESS})
        relay = self.relay(db, heartbeat_interval=2.0, lease_ttl=8.0)
        self.assertEqual((self.state(relay), len(agent.sockets)), (STREAMING, 1))
        db.fail = psycopg2.OperationalError("server closed the connection unexpectedly")
        self.network.run(5.9)
        self.assertEqual(len(agent.sockets), 1)
        self.network.run(0.2)  # 6 s = ttl - interval after the last good heartbeat
        self.assertEqual((self.state(relay), agent.sockets), (None, []))
        db.fail = None
        self.network.run(2.5)  # the next heartbeat
        self.assertEqual((self.state(relay), len(agent.sockets)), (STREAMING, 1))
