"""End to end: PostgreSQL, real lpa agents and the original's stub agent, followed by the relay.

One patch job on three hosts — a real agent streaming over the WebSocket, a real agent with
``websocket.enabled: false`` (polled through the events endpoint) and a stub-handshake agent with
100 KB of logs (polled through ``GET /jobs/{id}``) — from a manager-shaped ``relay.toml``; a
LISTEN
session sees host events for all three, every payload under 8000 bytes, and exactly one job-level
event with ``host_count`` 3 and ``succeeded_count`` 3.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from lpa import events as ev
from lpa.agent.config import parse_agent_config
from lpa.agent.service import make_agent_service
from lpa.relay.config import RelayConfig, load_relay_config
from lpa.relay.service import make_relay_service
from tests import pg
from tests.agentclient import mtls_client
from tests.certs import make_test_pki
from tests.fakeagents import LpaTestAgent, StubHandshakeAgent
from tests.fakes import FakeBackend, FakeSystem
from tests.logcheck import assert_no_unhandled, capture_events
from tests.pgutil import Listener, Seeder


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await deferLater(reactor, 0.1, lambda: None)


class RelayEndToEndTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-relay-e2e-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))
        self.events = capture_events(self)

    async def start_agent(self, name: str, extra: str = "") -> int:
        text = (
            "server:\n  bind: 127.0.0.1\n  port: 0\n"
            f"tls:\n  ca_cert: {self.pki.ca_cert}\n  server_cert: {self.pki.server_cert}\n"
            f"  server_key: {self.pki.server_key}\n  crl_path: {self.pki.crl}\n"
            f"state_dir: {os.path.join(self.tmp, name)}\n" + extra
        )
        service = make_agent_service(
            parse_agent_config(text, name),
            reactor=reactor,
            backend=FakeBackend(),
            system=FakeSystem(),
        )
        service.startService()
        waiting = service.listener._waitingForPort
        assert waiting is not None
        port = await waiting
        self.addCleanup(
            lambda: defer.ensureDeferred(service.stopService()) if service.running else None
        )
        number: int = port.getHost().port
        return number

    async def dry_run_job(self, port: int) -> str:
        client, pool = mtls_client(self.pki.client_options("good"))
        self.addCleanup(pool.closeCachedConnections)
        response = await client.post(
            f"https://localhost:{port}/api/v1/patches/apply", json={"dry_run": True}
        )
        body = json.loads(await response.content())
        self.assertEqual(response.code, 202, body)
        job_id: str = body["data"]["job_id"]
        return job_id

    async def test_three_hosts_one_job(self) -> None:
        """Streaming, events-polled and stub agents all end succeeded; one job-level notify."""
        dsn = pg.database(self, migrated=True)
        seeder = Seeder(dsn)
        self.addCleanup(seeder.close)
        listener = Listener(dsn)
        self.addCleanup(listener.close)

        streaming_port = await self.start_agent("streaming")
        polled_port = await self.start_agent("polled", "websocket:\n  enabled: false\n")
        stub = StubHandshakeAgent(reactor)
        stub.listen(self.pki.server_options(crl_path=None))
        self.addCleanup(stub.kill)
        stub_job = stub.add_job(status="running")

        config_path = os.path.join(self.tmp, "relay.toml")
        with open(config_path, "w") as handle:
            handle.write(
                '[server]\nbind = "0.0.0.0:8080"\n\n'
                f'[database]\nurl = "{dsn}"\nmax_connections = 10\n\n'
                "[worker]\nws_relay_poll_interval_secs = 1\nws_relay_scan_interval_secs = 0.5\n"
                "ws_relay_reconnect_initial_delay_secs = 0.5\n"
                "ws_relay_reconnect_max_delay_secs = 2\n\n"
                f'[security]\nagent_client_cert_path = "{self.pki.good.cert}"\n'
                f'agent_client_key_path = "{self.pki.good.key}"\n'
                f'ca_cert_path = "{self.pki.ca_cert}"\n'
            )
        relay = make_relay_service(load_relay_config(config_path, environ={}), reactor=reactor)
        relay.startService()

        async def stop_relay() -> None:
            await relay.stopService()
            await deferLater(reactor, 0.2, lambda: None)

        self.addCleanup(lambda: defer.ensureDeferred(stop_relay()))

        job_id = seeder.job("running")
        rows = []
        for ip, port, agent_job in (  # hosts are unique by (fqdn, ip); the relay dials the fqdn
            ("192.0.2.1", streaming_port, await self.dry_run_job(streaming_port)),
            ("192.0.2.2", polled_port, await self.dry_run_job(polled_port)),
            ("192.0.2.3", stub.port_number, stub_job),
        ):
            host_id = seeder.host("localhost", ip, port)
            rows.append(seeder.host_job(job_id, host_id, agent_job).row_id)

        await until(lambda: f"/api/v1/jobs/{stub_job}" in stub.requests, "stub job polled")
        stub.set_state(stub_job, "completed", logs=[f"{n:04d} " + "y" * 95 for n in range(1000)])
        await until(
            lambda: seeder.job_status(job_id) == "succeeded", "parent job succeeded", timeout=60
        )

        payloads = listener.collect(expected=4, timeout=5)
        self.assertTrue(all(len(raw.encode()) < 8000 for raw in listener.raw))
        host_events = [p for p in payloads if p["event_type"] == "host"]
        job_events = [p for p in payloads if p["event_type"] == "job"]
        self.assertEqual(len({p["agent_job_id"] for p in host_events}), 3)  # all three hosts
        self.assertEqual(len(job_events), 1)
        self.assertEqual((job_events[0]["host_count"], job_events[0]["succeeded_count"]), (3, 3))
        transports = [seeder.row(row)["relay_transport"] for row in rows]
        self.assertEqual(transports, ["ws", "poll", "poll"])
        self.assertEqual({seeder.row(row)["status"] for row in rows}, {"succeeded"})
        self.assertGreater(len(seeder.row(rows[2])["output"]), 100_000)
        assert_no_unhandled(self.events)

    async def test_relay_restart_resumes_from_database_seq(self) -> None:
        """A relay restarted mid-job resumes from relay_last_seq: nothing lost, nothing twice."""
        dsn = pg.database(self, migrated=True)
        seeder = Seeder(dsn)
        self.addCleanup(seeder.close)
        listener = Listener(dsn)
        self.addCleanup(listener.close)
        agent = LpaTestAgent(reactor)
        agent.listen(self.pki.server_options(crl_path=None))
        self.addCleanup(agent.kill)
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        agent.emit(job, ev.RUNNING, "line 1", kind=ev.KIND_OUTPUT)
        job_id = seeder.job("running")
        row = seeder.host_job(
            job_id, seeder.host("localhost", "192.0.2.9", agent.port_number), job
        ).row_id
        config = RelayConfig(
            database_url=dsn,
            scan_interval=0.3,
            poll_interval=0.3,
            reconnect_initial_delay=0.2,
            reconnect_max_delay=1.0,
            client_cert_path=self.pki.good.cert,
            client_key_path=self.pki.good.key,
            ca_cert_path=self.pki.ca_cert,
        )

        async def run_relay() -> Any:
            relay = make_relay_service(config, reactor=reactor)
            relay.startService()
            self.addCleanup(
                lambda: defer.ensureDeferred(relay.stopService()) if relay.running else None
            )
            return relay

        first = await run_relay()
        await until(lambda: seeder.row(row)["relay_last_seq"] == 2, "first relay applied seq 2")
        await first.stopService()
        agent.emit(job, ev.RUNNING, "line 2", kind=ev.KIND_OUTPUT)
        agent.emit(job, ev.RUNNING, "line 3", kind=ev.KIND_OUTPUT)
        await run_relay()
        await until(lambda: seeder.row(row)["relay_last_seq"] == 4, "second relay applied seq 4")
        agent.finish(job)
        await until(lambda: seeder.job_status(job_id) == "succeeded", "parent job succeeded")
        subscribes = [m for m in agent.ws_messages if m.get("action") == "subscribe"]
        self.assertEqual([m["after_seq"] for m in subscribes], [0, 2])
        self.assertEqual(seeder.row(row)["output"], "line 1\nline 2\nline 3")
        payloads = listener.collect(expected=4, timeout=5)
        seqs = [p["seq"] for p in payloads if p["event_type"] == "host"]
        self.assertEqual(seqs, sorted(set(seqs)))
        self.assertEqual(seqs[-1], 5)
        self.assertEqual(len([p for p in payloads if p["event_type"] == "job"]), 1)
        assert_no_unhandled(self.events)

    async def test_postgresql_restart_loses_nothing(self) -> None:
        """Events streamed while PostgreSQL is down are applied in order once it is back."""
        dsn = pg.database(self, migrated=True)
        seeder = Seeder(dsn)
        agent = LpaTestAgent(reactor)
        agent.listen(self.pki.server_options(crl_path=None))
        self.addCleanup(agent.kill)
        job = agent.add_job()
        agent.emit(job, ev.RUNNING, "Job started")
        job_id = seeder.job("running")
        host = seeder.host("localhost", "192.0.2.7", agent.port_number)
        row = seeder.host_job(job_id, host, job).row_id
        config = RelayConfig(
            database_url=dsn,
            scan_interval=0.3,
            poll_interval=0.3,
            reconnect_initial_delay=0.2,
            reconnect_max_delay=1.0,
            client_cert_path=self.pki.good.cert,
            client_key_path=self.pki.good.key,
            ca_cert_path=self.pki.ca_cert,
        )
        relay = make_relay_service(config, reactor=reactor)
        relay.startService()
        self.addCleanup(
            lambda: defer.ensureDeferred(relay.stopService()) if relay.running else None
        )
        await until(lambda: seeder.row(row)["relay_last_seq"] == 1, "first event applied")
        seeder.close()
        server = pg.cluster()
        server.stop()
        self.addCleanup(lambda: None if server.running else server.start())
        for n in range(10):
            agent.emit(job, ev.RUNNING, f"line {n}", kind=ev.KIND_OUTPUT)
        agent.finish(job)
        await deferLater(reactor, 1.0, lambda: None)  # a few scans fail meanwhile
        server.start()
        seeder = Seeder(dsn)
        self.addCleanup(seeder.close)
        await until(lambda: seeder.job_status(job_id) == "succeeded", "parent job succeeded")
        self.assertEqual(seeder.row(row)["output"], "\n".join(f"line {n}" for n in range(10)))
        self.assertEqual(seeder.row(row)["relay_last_seq"], 12)
        self.assertEqual(self.flushLoggedErrors(), [])  # the outage logged no traceback
