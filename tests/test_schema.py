"""``lpa db migrate`` against a real throwaway cluster: idempotent and safe on a manager DB."""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from lpa.relay import migrate as migrate_command
from lpa.relay import schema
from lpa.relay.schema import (
    RELAY_COLUMNS,
    RELAY_DEADLINE_COLUMNS,
    RELAY_JOB_COLUMNS,
    RELAY_UNREACHABLE_COLUMNS,
    RELAY_WRITEPATH_COLUMNS,
    MigrationError,
    migrate,
    migration_names,
)
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
    ("SELECT table_name, column_name, data_type, is_nullable, column_default "
     "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2"),
    "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
    ("SELECT t.typname, e.enumlabel, e.enumsortorder FROM pg_enum e "
     "JOIN pg_type t ON t.oid = e.enumtypid ORDER BY 1, 3"),
    ("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
     "WHERE connamespace = 'public'::regnamespace ORDER BY 1"),
]


def _snapshot(seed: Seeder) -> list[Any]:
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
        applied = migrate(self.dsn)
        self.assertEqual([step.name for step in applied], list(migration_names()))
        self.assertIn("created tables: hosts, patch_job_hosts, patch_jobs", applied[0].changes)
        self.assertIn("created enum types: host_health_status, job_kind, job_status",
                      applied[0].changes)
        self.assertTrue({"hosts", "patch_jobs", "patch_job_hosts"} <= {
            row[0] for row in self.seed.all(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")})
        self.assertTrue(set(RELAY_COLUMNS) <= _columns(self.seed, "patch_job_hosts"))
        self.assertTrue({"agent_job_id", "output", "retry_next_at", "last_error"}
                        <= _columns(self.seed, "patch_job_hosts"))
        self.assertTrue(
            {"agent_port", "machine_id", "reboot_paused"} <= _columns(self.seed, "hosts"))
        labels = [row[0] for row in self.seed.all(
            "SELECT unnest(enum_range(NULL::job_status))::text")]
        self.assertEqual(labels, ["queued", "pending", "running", "succeeded", "failed",
                                  "cancelled", "waiting_health_check"])
        indexes = {row[0] for row in self.seed.all(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'patch_job_hosts'")}
        self.assertTrue({"idx_patch_job_hosts_job_id", "idx_patch_job_hosts_status"} <= indexes)
        self.assertEqual(self.seed.one(
            "SELECT output, relay_last_seq FROM patch_job_hosts LIMIT 1"), None)
        self.assertTrue(set(RELAY_JOB_COLUMNS) <= _columns(self.seed, "patch_jobs"))
        self.assertEqual(_columns(self.seed, "relay_output_pending"), {"id", "row_id", "text"})
        self.assertIn("relay_open_host_rows", indexes)

    def test_migrating_twice_changes_nothing(self) -> None:
        """A second run leaves columns, indexes, enums and constraints exactly as they were."""
        migrate(self.dsn)
        before = _snapshot(self.seed)
        self.assertEqual([step.changes for step in migrate(self.dsn)],
                         [()] * len(migration_names()))
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
        steps = migrate(self.dsn)
        changes = steps[0].changes
        self.assertIn("added enum values: job_kind.self_upgrade, job_status.waiting_health_check",
                      changes)
        self.assertIn("added columns: " + ", ".join(
            f"patch_job_hosts.{column}" for column in sorted(RELAY_COLUMNS)), changes)
        self.assertFalse(any(line.startswith("created tables") for line in changes), changes)
        self.assertIn("added columns: " + ", ".join(sorted(
            [f"patch_job_hosts.{column}" for column in RELAY_WRITEPATH_COLUMNS]
            + [f"patch_jobs.{column}" for column in RELAY_JOB_COLUMNS])), steps[1].changes)
        migrate(self.dsn)
        self.assertEqual(
            self.seed.one("SELECT status::text, agent_job_id, output, relay_last_seq, "
                          "relay_transport FROM patch_job_hosts"),
            ("running", "a1", "half done", 0, None))
        self.assertEqual(_columns(self.seed, "patch_job_hosts"),
                         manager_columns | set(RELAY_COLUMNS) | set(RELAY_DEADLINE_COLUMNS)
                         | set(RELAY_UNREACHABLE_COLUMNS) | set(RELAY_WRITEPATH_COLUMNS))
        # the manager's own tables were not re-created or extended
        self.assertEqual(_columns(self.seed, "hosts"),
                         {"id", "fqdn", "ip_address", "display_name", "agent_port",
                          "health_status"})
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
        """A table lock held by the manager makes migrate fail after lock_timeout, nothing
        applied."""
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
        """`lpa db migrate --dsn DSN` says what each file created or added, then that a second
        run had nothing to do."""
        dsn = pg.database(self)
        args = self.parse(["db", "migrate", "--dsn", dsn])
        out = io.StringIO()
        self.assertEqual(args.func(args, out), 0)
        lines = out.getvalue().splitlines()
        database = dsn.rsplit("/", 1)[1].split("?")[0]
        self.assertEqual(lines[0], "001_relay.sql:")
        self.assertIn("    created tables: hosts, patch_job_hosts, patch_jobs", lines)
        self.assertTrue(lines[-1].startswith(f"lpa: schema of database {database} migrated ("),
                        lines)
        self.assertNotIn("up to date (", out.getvalue())
        out = io.StringIO()
        self.assertEqual(args.func(args, out), 0)
        self.assertEqual(out.getvalue(), "".join(
            f"{name}: already in place, nothing to do\n" for name in migration_names())
            + f"lpa: schema of database {database} was already up to date; nothing changed\n")
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


class SeveralFilesTests(SynchronousTestCase):
    """Every lpa/sql/NNN_*.sql file applies, in order, in one transaction, each reported."""

    def test_files_in_order_each_reported(self) -> None:
        """Later files see earlier ones; each reports only its own changes; a failing file
        rolls back all of them."""
        files = {"001_a.sql": "CREATE TABLE a (x int)",
                 "002_b.sql": "ALTER TABLE a ADD COLUMN y int; CREATE INDEX a_y ON a (y)",
                 "003_c.sql": "SELECT 1"}
        self.patch(schema, "migration_sql", files.__getitem__)
        self.patch(schema, "MIGRATIONS", tuple(files))
        dsn = pg.database(self)
        applied = migrate(dsn)
        self.assertEqual([(step.name, step.changes) for step in applied], [
            ("001_a.sql", ("created tables: a",)),
            ("002_b.sql", ("added columns: a.y", "added indexes: a.a_y")),
            ("003_c.sql", ()),
        ])
        files["003_c.sql"] = "CREATE TABLE c (z int); SELECT no_such_column FROM a"
        files["001_a.sql"] = "CREATE TABLE IF NOT EXISTS a (x int)"
        files["002_b.sql"] = "ALTER TABLE a ADD COLUMN IF NOT EXISTS y2 int"
        error = self.assertRaises(MigrationError, migrate, dsn)
        self.assertIn("nothing changed", str(error))
        seed = Seeder(dsn)
        self.addCleanup(seed.close)
        self.assertEqual(_columns(seed, "a"), {"x", "y"})
        self.assertEqual(_columns(seed, "c"), set())

    def test_relay_membership_tables(self) -> None:
        """003 adds the relays' membership and lease tables (UNLOGGED), once."""
        self.assertIn("003_relay_membership.sql", migration_names())
        dsn = pg.database(self)
        migrate(dsn)
        seed = Seeder(dsn)
        self.addCleanup(seed.close)
        self.assertLessEqual(
            {"relay_id", "incarnation", "heartbeat_at", "expires_at"},
            _columns(seed, "relay_members"),
        )
        self.assertEqual(
            _columns(seed, "relay_agent_leases"),
            {"agent_host", "agent_port", "relay_id", "claimed_at"},
        )
        persistence = dict(seed.all(
            "SELECT relname::text, relpersistence::text FROM pg_class "
            "WHERE relname IN ('relay_members', 'relay_agent_leases')"))
        self.assertEqual(persistence, {"relay_members": "u", "relay_agent_leases": "u"})
        self.assertEqual([step.changes for step in migrate(dsn)], [()] * len(migration_names()))

    def test_packaged_names(self) -> None:
        """migration_names lists the packaged NNN_name.sql files, sorted, 001_relay.sql first."""
        names = migration_names()
        self.assertEqual(names[0], "001_relay.sql")
        self.assertEqual(list(names), sorted(names))
        self.assertTrue(all(re.fullmatch(r"\d{3}_\w+\.sql", name) for name in names))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PsqlTests(SynchronousTestCase):
    """etc/schema.sql is the same schema for psql, run with the command its comment gives."""

    def test_includes_every_migration_in_order(self) -> None:
        """etc/schema.sql includes each lpa/sql/NNN_*.sql once, in order."""
        with open(os.path.join(ROOT, "etc", "schema.sql"), encoding="utf-8") as handle:
            included = re.findall(r"^\\ir \.\./lpa/sql/(\S+)$", handle.read(), re.M)
        self.assertEqual(included, list(migration_names()))

    def test_psql_line_as_written(self) -> None:
        """The psql line in etc/schema.sql, run from the checkout, builds what lpa db migrate
        builds, and a second run changes nothing."""
        psql = shutil.which("psql")
        if psql is None:
            self.skipTest("psql is not installed here")
        with open(os.path.join(ROOT, "etc", "schema.sql"), encoding="utf-8") as handle:
            commands = [line.removeprefix("--").strip() for line in handle
                        if line.removeprefix("--").strip().startswith("psql ")]
        self.assertEqual(len(commands), 1, commands)
        by_psql, by_lpa = pg.database(self), pg.database(self)
        migrate(by_lpa)
        for _ in range(2):
            done = subprocess.run(["bash", "-c", commands[0]], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120, check=False,
                                  env=dict(os.environ, DATABASE_URL=by_psql))
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertNotIn("ERROR", done.stderr)
        seeds = [Seeder(by_psql), Seeder(by_lpa)]
        for seed in seeds:
            self.addCleanup(seed.close)
        self.assertEqual(_snapshot(seeds[0]), _snapshot(seeds[1]))
