"""``lpa db migrate`` against a real throwaway cluster: idempotent and safe on a manager DB."""

from __future__ import annotations

import argparse
import io

from twisted.trial.unittest import SynchronousTestCase

from lpa.relay import migrate as migrate_command
from lpa.relay.schema import RELAY_COLUMNS, MigrationError, migrate
from tests import pg
from tests.pgutil import Seeder

#: the shape an older manager database has: before migration 008 (no waiting_health_check) and
#: 023 (no self_upgrade), with a users table and foreign keys the relay never creates
_OLD_MANAGER_SCHEMA = """
CREATE TYPE job_status AS ENUM ('queued','pending','running','succeeded','failed','cancelled');
CREATE TYPE job_kind AS ENUM ('patch_apply','patch_remove','reboot','rollback');
CREATE TYPE host_health_status AS ENUM ('pending','healthy','degraded','unreachable');
CREATE TABLE users (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), name TEXT NOT NULL);
CREATE TABLE hosts (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(), fqdn TEXT NOT NULL, ip_address INET NOT NULL,
    display_name TEXT NOT NULL DEFAULT '', agent_port INTEGER NOT NULL DEFAULT 12443,
    health_status host_health_status NOT NULL DEFAULT 'pending', UNIQUE (fqdn, ip_address));
CREATE TABLE patch_jobs (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(), kind job_kind NOT NULL DEFAULT 'patch_apply',
    status job_status NOT NULL DEFAULT 'queued', created_by_user_id UUID REFERENCES users(id),
    notes TEXT NOT NULL DEFAULT '');
CREATE TABLE patch_job_hosts (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id UUID NOT NULL REFERENCES patch_jobs(id) ON DELETE CASCADE,
    host_id UUID NOT NULL REFERENCES hosts(id), status job_status NOT NULL DEFAULT 'queued',
    agent_job_id TEXT, retry_count INT NOT NULL DEFAULT 0, output TEXT NOT NULL DEFAULT '',
    error_message TEXT, started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ, UNIQUE (job_id, host_id));
CREATE INDEX manager_pjh_status ON patch_job_hosts (status);
"""

_SNAPSHOT_SQL = [
    "SELECT table_name, column_name, data_type, is_nullable, column_default "
    "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
    "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
    "SELECT t.typname, e.enumlabel, e.enumsortorder FROM pg_enum e "
    "JOIN pg_type t ON t.oid = e.enumtypid ORDER BY 1, 3",
    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE connamespace = 'public'::regnamespace ORDER BY 1",
]


def _snapshot(seed: Seeder) -> list:
    return [seed.all(sql) for sql in _SNAPSHOT_SQL]


def _columns(seed: Seeder, table: str) -> set[str]:
    return {
        row[0]
        for row in seed.all(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,)
        )
    }


class MigrateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dsn = pg.database(self)
        self.seed = Seeder(self.dsn)
        self.addCleanup(self.seed.close)

    def test_fresh_database_gets_manager_tables_and_relay_columns(self) -> None:
        """On an empty database: enums, the three tables, their indexes and the relay columns."""
        migrate(self.dsn)
        self.assertTrue({"hosts", "patch_jobs", "patch_job_hosts"} <= {
            row[0] for row in self.seed.all(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")})
        self.assertTrue(set(RELAY_COLUMNS) <= _columns(self.seed, "patch_job_hosts"))
        self.assertTrue({"agent_job_id", "output", "retry_next_at", "last_error"}
                        <= _columns(self.seed, "patch_job_hosts"))
        self.assertTrue({"agent_port", "machine_id", "reboot_paused"} <= _columns(self.seed, "hosts"))
        labels = [row[0] for row in self.seed.all(
            "SELECT unnest(enum_range(NULL::job_status))::text")]
        self.assertEqual(labels, ["queued", "pending", "running", "succeeded", "failed",
                                  "cancelled", "waiting_health_check"])
        indexes = {row[0] for row in self.seed.all(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'patch_job_hosts'")}
        self.assertTrue({"idx_patch_job_hosts_job_id", "idx_patch_job_hosts_status"} <= indexes)
        self.assertEqual(self.seed.one(
            "SELECT output, relay_last_seq FROM patch_job_hosts LIMIT 1"), None)

    def test_migrating_twice_changes_nothing(self) -> None:
        """A second run leaves columns, indexes, enums and constraints exactly as they were."""
        migrate(self.dsn)
        before = _snapshot(self.seed)
        migrate(self.dsn)
        self.assertEqual(_snapshot(self.seed), before)

    def test_existing_manager_database_keeps_its_data(self) -> None:
        """On an older manager DB: data intact, missing enum values and relay columns added only."""
        self.seed.execute(_OLD_MANAGER_SCHEMA)
        user = self.seed.one("INSERT INTO users (name) VALUES ('alice') RETURNING id::text")[0]
        host = self.seed.host("agent1.example")
        job = self.seed.one(
            "INSERT INTO patch_jobs (status, created_by_user_id) VALUES ('running', %s) "
            "RETURNING id::text", (user,))[0]
        self.seed.execute(
            "INSERT INTO patch_job_hosts (job_id, host_id, status, agent_job_id, output) "
            "VALUES (%s, %s, 'running', 'a1', 'half done')", (job, host))
        manager_columns = _columns(self.seed, "patch_job_hosts")
        migrate(self.dsn)
        migrate(self.dsn)
        self.assertEqual(
            self.seed.one("SELECT status::text, agent_job_id, output, relay_last_seq, relay_transport "
                          "FROM patch_job_hosts"),
            ("running", "a1", "half done", 0, None))
        self.assertEqual(_columns(self.seed, "patch_job_hosts"), manager_columns | set(RELAY_COLUMNS))
        # the manager's own tables were not re-created or extended
        self.assertEqual(_columns(self.seed, "hosts"),
                         {"id", "fqdn", "ip_address", "display_name", "agent_port", "health_status"})
        self.assertEqual(self.seed.one("SELECT count(*) FROM users")[0], 1)
        labels = {row[0] for row in self.seed.all(
            "SELECT unnest(enum_range(NULL::job_status))::text")}
        self.assertIn("waiting_health_check", labels)
        kinds = {row[0] for row in self.seed.all("SELECT unnest(enum_range(NULL::job_kind))::text")}
        self.assertIn("self_upgrade", kinds)
        indexes = {row[0] for row in self.seed.all(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'patch_job_hosts'")}
        self.assertNotIn("idx_patch_job_hosts_status", indexes)  # no duplicate of manager's index

    def test_busy_table_fails_fast_and_changes_nothing(self) -> None:
        """A table lock held by the manager makes migrate fail after lock_timeout, nothing applied."""
        self.seed.execute(_OLD_MANAGER_SCHEMA)
        before = _snapshot(self.seed)
        holder = Seeder(self.dsn)
        self.addCleanup(holder.close)
        holder.connection.autocommit = False
        holder.execute("LOCK TABLE patch_job_hosts IN ACCESS SHARE MODE")
        error = self.assertRaises(MigrationError, migrate, self.dsn, lock_timeout_ms=200)
        holder.connection.rollback()
        self.assertIn("nothing changed", str(error))
        self.assertIn("lock timeout", str(error))
        self.assertEqual(_snapshot(self.seed), before)

    def test_unreachable_database_is_one_clear_line(self) -> None:
        """A DSN nobody answers gives a one-line MigrationError, not a traceback."""
        bad = pg.cluster().dsn("no_such_database_here")
        error = self.assertRaises(MigrationError, migrate, bad)
        self.assertIn("cannot connect", str(error))
        self.assertNotIn("\n", str(error))


class CommandTests(SynchronousTestCase):
    def parse(self, argv: list[str]) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog="lpa")
        migrate_command.add_parser(parser.add_subparsers(dest="command", required=True))
        return parser.parse_args(argv)

    def test_db_migrate_with_dsn(self) -> None:
        """`lpa db migrate --dsn DSN` applies the schema and exits 0."""
        dsn = pg.database(self)
        args = self.parse(["db", "migrate", "--dsn", dsn])
        out = io.StringIO()
        self.assertEqual(args.func(args, out), 0)
        self.assertEqual(out.getvalue(), "lpa: schema up to date (001_relay.sql)\n")
        seed = Seeder(dsn)
        self.addCleanup(seed.close)
        self.assertTrue(set(RELAY_COLUMNS) <= _columns(seed, "patch_job_hosts"))

    def test_db_migrate_reads_database_url_from_config(self) -> None:
        """Without --dsn the manager's config.toml [database] url is used."""
        dsn = pg.database(self)
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f'[database]\nurl = "{dsn}"\n[server]\nport = 443\n')
        args = self.parse(["db", "migrate", "--config", path])
        self.assertEqual(args.func(args, io.StringIO()), 0)
        seed = Seeder(dsn)
        self.addCleanup(seed.close)
        self.assertIn("relay_last_seq", _columns(seed, "patch_job_hosts"))
