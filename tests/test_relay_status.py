"""``lpa relay status`` against a real PostgreSQL: relays, heartbeats, shares, gaps, errors."""

from __future__ import annotations

import io
import json

from twisted.trial.unittest import SynchronousTestCase

from lpa.errors import LpaError
from lpa.relay.status import fleet_status, format_status
from lpa.tools import cli
from tests import pg
from tests.pgutil import Seeder


class StatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dsn = pg.database(self, migrated=True)
        self.seed = Seeder(self.dsn)
        self.addCleanup(self.seed.close)
        job = self.seed.job("running")
        for n in range(4):  # agents 0..3, agent 3 with two running host rows (two jobs)
            host = self.seed.host("localhost", f"192.0.2.{n + 1}", 20000 + n)
            self.seed.host_job(job, host, f"a{n}")
        other = self.seed.job("running")
        self.seed.host_job(other, self.seed.host("localhost", "192.0.2.9", 20003), "a9")
        self.member("relay-a", "0 s", "8 s")
        self.member("relay-b", "1 s", "7 s")
        self.member("relay-gone", "20 s", "-12 s")
        for port, relay in ((20000, "relay-a"), (20001, "relay-a"), (20003, "relay-b"),
                            (20002, "relay-gone")):
            self.seed.execute(
                "INSERT INTO relay_agent_leases (agent_host, agent_port, relay_id) "
                "VALUES ('localhost', %s, %s)", (port, relay))

    def member(self, relay_id: str, age: str, expires: str) -> None:
        self.seed.execute(
            "INSERT INTO relay_members (relay_id, incarnation, hostname, pid, heartbeat_at, "
            "expires_at) VALUES (%s, gen_random_uuid(), 'mgr1', 42, now() - %s::interval, "
            "now() + %s::interval)",
            (relay_id, age, expires),
        )

    def test_relays_and_what_they_follow(self) -> None:
        """Per relay: live or expired, heartbeat age by the database clock, agents and jobs."""
        status = fleet_status(self.dsn)
        table = {r.relay_id: (r.live, r.agents, r.jobs) for r in status.relays}
        self.assertEqual(
            table,
            {"relay-a": (True, 2, 2), "relay-b": (True, 1, 2), "relay-gone": (False, 1, 1)},
        )
        ages = {r.relay_id: r.heartbeat_age_secs for r in status.relays}
        self.assertTrue(1 <= ages["relay-b"] < 2 and 20 <= ages["relay-gone"] < 21, ages)
        # agent 2 is leased by an expired relay: nobody follows it
        self.assertEqual(
            (status.agents, status.jobs, status.unfollowed_agents, status.unfollowed_jobs),
            (4, 5, 1, 1),
        )

    def test_human_output(self) -> None:
        """A header, one line per relay, then the totals."""
        text = format_status(fleet_status(self.dsn))
        lines = text.splitlines()
        self.assertEqual(lines[0].split()[:4], ["RELAY", "STATE", "HOST", "PID"])
        self.assertEqual(lines[3].split()[:2], ["relay-gone", "expired"])
        self.assertEqual(
            lines[-1],
            "agents with running jobs: 4 (3 followed, 1 not followed); "
            "running host jobs: 5 (1 not followed)",
        )

    def test_cli_json(self) -> None:
        """`lpa relay status --dsn DSN --json` prints one JSON object and exits 0."""
        parser = cli.build_parser()
        args = parser.parse_args(["relay", "status", "--dsn", self.dsn, "--json"])
        out = io.StringIO()
        self.assertEqual(args.func(args, out), 0)
        document = json.loads(out.getvalue())
        self.assertEqual([r["relay_id"] for r in document["relays"]],
                         ["relay-a", "relay-b", "relay-gone"])
        self.assertEqual(document["unfollowed_agents"], 1)

    def test_missing_tables_and_unreachable_database(self) -> None:
        """Without the tables: run lpa db migrate; no database: one line, no traceback."""
        error = self.assertRaises(LpaError, fleet_status, pg.database(self))
        self.assertIn("lpa db migrate", str(error))
        error = self.assertRaises(LpaError, fleet_status, pg.cluster().dsn("no_such_db"))
        self.assertIn("cannot connect", str(error))
        self.assertNotIn("\n", str(error))
