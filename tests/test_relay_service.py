"""The relay service wiring, its stop order, and the twistd plugin on bad configuration."""

from __future__ import annotations

import io
import os
import sys
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lpa.relay import tap
from lpa.relay.config import RelayConfig
from lpa.relay.interfaces import AgentAddress
from lpa.relay.machine import CONNECTING
from lpa.relay.service import RelayService, make_relay_service
from tests.fakes_membership import FakeMembershipDatabase
from tests.fakes_relay import FakeRelayStore
from tests.test_relay_feed import ListenConnection
from tests.test_relay_opsservice import HeldEndpoint, StandInPort, held_ops_service

ADDRESS = AgentAddress("agent1.example", 12443)


class FakeWs:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.closing: Deferred[None] = Deferred()

    def send_json(self, message: dict[str, Any]) -> bool:
        return False

    def stop(self) -> Deferred[None]:
        self.log.append("ws closing")
        return self.closing


class OrderedStore(FakeRelayStore):
    """A fake store that also has the real store's start/stop, recording the order of stops."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def start(self) -> Deferred[None]:
        self.log.append("store start")
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self.log.append("store stop")
        return succeed(None)


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.log: list[str] = []
        self.store = OrderedStore(self.log)
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id="a1", agent=ADDRESS
        )
        self.sockets: list[FakeWs] = []

        def dial(address: AgentAddress, listener: Any) -> FakeWs:
            self.log.append(f"dial {address.host}:{address.port}")
            ws = FakeWs(self.log)
            self.sockets.append(ws)
            return ws

        self.config = RelayConfig(database_url="postgres://x@localhost/db", scan_interval=5)
        self.dial = dial

    def make_service(self) -> RelayService:
        """The relay service of :attr:`config` on the Clock, the fake store and the fake dial."""
        return make_relay_service(
            self.config,
            reactor=self.clock,
            clock=self.clock,
            store=self.store,
            tls_options_for=lambda host: "tls",
            http_client=object(),
            dial=self.dial,
        )

    def test_make_relay_service_scans_and_dials(self) -> None:
        """Started, the service scans the store and dials each agent with running rows."""
        service = self.make_service()
        service.startService()
        self.assertEqual(self.log, ["dial agent1.example:12443"])
        [link] = service.scanner.links.values()
        self.assertEqual(link.state, CONNECTING)
        stopping = service.stopService()
        self.sockets[0].closing.callback(None)
        self.successResultOf(stopping)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_order(self) -> None:
        """stopService: scanning stops, links close (awaited), and only then the store stops."""
        service = self.make_service()
        owned = RelayService(self.store, service.scanner, own_store=True)
        owned.startService()
        stopping = owned.stopService()
        self.assertNoResult(stopping)
        self.assertEqual(self.log, ["store start", "dial agent1.example:12443", "ws closing"])
        self.sockets[0].closing.callback(None)
        self.successResultOf(stopping)
        self.assertEqual(self.log[-1], "store stop")
        self.clock.advance(60)
        self.assertEqual(len([c for c in self.store.calls if c.method == "running_host_jobs"]), 1)

    def test_ops_port_opens_at_start_and_stop_waits_until_it_closed(self) -> None:
        """With an ops port, starting the relay opens it; the relay's stop closes it and fires
        only once it is closed, links closed or not."""
        service = self.make_service()
        endpoint, connection = HeldEndpoint(), ListenConnection()
        service.ops = held_ops_service(endpoint, connection)
        service.startService()
        self.assertIs(endpoint.factory.resource, service.ops.root)
        self.assertEqual(connection.dsn, "postgresql://relay@db.example/pm")
        port = StandInPort(closing=Deferred())
        endpoint.listening.callback(port)
        self.assertEqual(service.ops.url, "http://127.0.0.1:12480/")
        stopping = service.stopService()
        self.assertEqual(port.stopped, 1)
        self.sockets[0].closing.callback(None)
        self.assertNoResult(stopping)
        port.closing.callback(None)
        self.successResultOf(stopping)
        self.assertTrue(connection.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_certificate_files_are_config_errors(self) -> None:
        """Unreadable [security] files stop the build with a ConfigError naming the file."""
        from lpa.errors import ConfigError

        config = RelayConfig(
            database_url="postgres://x@localhost/db", ca_cert_path="/nonexistent/ca.crt"
        )
        error = self.assertRaises(
            ConfigError,
            make_relay_service,
            config,
            reactor=self.clock,
            store=self.store,
            dial=self.dial,
        )
        self.assertIn("/nonexistent/ca.crt", str(error))


class MembershipWiringTests(SynchronousTestCase):
    """With a membership database, the relay follows what its leases say and leaves on stop."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.log: list[str] = []
        self.store = OrderedStore(self.log)
        self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id="a1", agent=ADDRESS
        )
        self.sockets: list[FakeWs] = []
        self.db = FakeMembershipDatabase()
        self.service = make_relay_service(
            RelayConfig(
                database_url="postgres://x@localhost/db", scan_interval=5, relay_id="relay-a"
            ),
            reactor=self.clock,
            clock=self.clock,
            store=self.store,
            tls_options_for=lambda host: "tls",
            http_client=object(),
            dial=self.dial,
            membership_database=self.db,
        )

    def dial(self, address: AgentAddress, listener: Any) -> FakeWs:
        self.log.append(f"dial {address.host}:{address.port}")
        ws = FakeWs(self.log)
        self.sockets.append(ws)
        return ws

    def test_follows_only_after_the_lease(self) -> None:
        """Nothing is dialled before the first heartbeat; the leased agent is dialled after it."""
        self.db.hold()
        self.service.startService()
        self.clock.advance(0)
        self.assertEqual(self.sockets, [])
        self.db.owned = frozenset({ADDRESS})
        self.db.release()
        self.clock.advance(2)
        self.assertEqual(self.log, ["dial agent1.example:12443"])
        assert self.service.membership is not None
        self.assertEqual(self.service.membership.relay_id, "relay-a")

    def test_stop_leaves_while_links_close_then_stops_the_store(self) -> None:
        """stopService: leave (hand over at once) without waiting for close frames; store last."""
        self.db.owned = frozenset({ADDRESS})
        owned = RelayService(
            self.store,
            self.service.scanner,
            own_store=True,
            membership=self.service.membership,
        )
        owned.startService()
        self.clock.advance(0)
        stopping = owned.stopService()
        self.assertEqual(self.db.calls[-2:], ["leave", "close"])
        self.assertNoResult(stopping)
        self.sockets[0].closing.callback(None)
        self.successResultOf(stopping)
        self.assertEqual(self.log[-1], "store stop")
        self.assertEqual(self.clock.getDelayedCalls(), [])


    def test_readyz_of_a_lone_relay_whose_heartbeats_fail(self) -> None:
        """/readyz's membership check says a lone relay keeps following its agents, not that it
        follows nothing."""
        import psycopg2

        service = make_relay_service(
            RelayConfig(database_url="postgres://x@localhost/db", relay_id="relay-a"),
            reactor=self.clock, clock=self.clock, store=self.store,
            tls_options_for=lambda host: "tls", http_client=object(), dial=self.dial,
            membership_database=self.db, ops=True, ops_connection_factory=lambda: None,
        )
        assert service.membership is not None and service.ops is not None
        self.db.owned, self.db.members = frozenset({ADDRESS}), 1
        self.successResultOf(service.membership.start())
        self.addCleanup(service.membership.stop)
        self.clock.advance(0)
        self.assertNotIn("membership", service.ops.readiness.failures())
        self.db.fail = psycopg2.OperationalError("server closed the connection unexpectedly")
        self.clock.advance(service.membership.lease_ttl)
        self.assertEqual(service.membership.owned, frozenset({ADDRESS}))
        self.assertEqual(
            service.ops.readiness.failures()["membership"],
            "our membership lapsed (no heartbeat within the lease); as the only relay it keeps "
            "following its 1 agent",
        )


class TapTests(SynchronousTestCase):
    def test_default_config_path(self) -> None:
        """--config defaults to /etc/lpa/relay.toml."""
        self.assertEqual(tap.Options()["config"], "/etc/lpa/relay.toml")

    def test_bad_config_one_line_exit_78(self) -> None:
        """A bad value prints one line on stderr and exits 78 (EX_CONFIG), without a traceback."""
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "relay.toml")
        with open(path, "w") as handle:
            handle.write(
                '[database]\nurl = "postgres://x@localhost/db"\n'
                '[worker]\nws_relay_scan_interval_secs = "soon"\n'
            )
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)  # where lpa.configkit reports a bad config file
        exit_ = self.assertRaises(SystemExit, tap.Options().parseOptions, ["--config", path])
        self.assertEqual(exit_.code, 78)
        self.assertEqual(stderr.getvalue().count("\n"), 1)
        self.assertIn("ws_relay_scan_interval_secs", stderr.getvalue())

    def test_observer_logs_at_the_configured_level(self) -> None:
        """The tap's log observer drops debug lines by default and honours [logging] level."""
        import signal

        from twisted.logger import Logger, LogPublisher

        from lpa.logs import LogConfiguredService
        from tests.certs import make_test_pki

        pki = make_test_pki(os.path.abspath(self.mktemp()))
        from lpa.relay import pgadapter

        self.patch(signal, "signal", lambda signum, handler: None)  # the tap's SIGHUP line
        # the database check at start is pinned in tests.test_pgadapter; here it is not the point
        self.patch(pgadapter, "check_database", lambda url, where: None)
        written = []
        for level in ("", 'level = "warn"\n'):
            path = os.path.abspath(self.mktemp())
            with open(path, "w") as handle:
                handle.write(
                    '[database]\nurl = "postgres://x@localhost/db"\n'
                    f'[security]\nagent_client_cert_path = "{pki.good.cert}"\n'
                    f'agent_client_key_path = "{pki.good.key}"\nca_cert_path = "{pki.ca_cert}"\n'
                    f'[logging]\nformat = "text"\n{level}[ops]\nenabled = false\n'
                )
            options = tap.Options()
            options.parseOptions(["--config", path])
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            root = tap.makeService(options)
            assert isinstance(root, LogConfiguredService)
            assert root.observer is not None
            log = Logger(namespace="t", observer=LogPublisher(root.observer))
            for method in (log.debug, log.info, log.warn):
                method("a {name} line", name=method.__name__)
            written.append([name for name in ("debug", "info", "warn")
                            if f"a {name} line" in out.getvalue()])
        self.assertEqual(written, [["info", "warn"], ["warn"]])
