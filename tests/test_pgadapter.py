"""lpa.relay.pgadapter: how the relay names its database, tells a dead session from a failed
statement, and refuses to start against a database it cannot reach."""

from __future__ import annotations

import io
import os
import sys

import psycopg2
import psycopg2.errors
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from txpostgres.txpostgres import RollbackFailed

from lpa.relay import tap
from lpa.relay.pgadapter import (
    EXIT_DATABASE_UNREACHABLE,
    DatabaseUnreachable,
    check_database,
    describe_dsn,
    first_line,
    is_connection_failure,
)
from tests import pg
from tests.certs import make_test_pki


class Coded(psycopg2.OperationalError):
    """An OperationalError with the SQLSTATE the server would have sent."""

    def __init__(self, pgcode: str) -> None:
        super().__init__(f"error {pgcode}")
        self._code = pgcode

    @property
    def pgcode(self) -> str:  # type: ignore[override]
        return self._code


class NamingTests(SynchronousTestCase):
    def test_describe_dsn_never_shows_the_password(self) -> None:
        """user@host:port/database from a URL or key/value DSN, without the password."""
        self.assertEqual(describe_dsn("postgresql://relay:s3cret@db.example:5433/manager"),
                         "relay@db.example:5433/manager")
        self.assertEqual(describe_dsn("host=10.0.0.5 dbname=pm user=pm password=x"),
                         "pm@10.0.0.5:5432/pm")

    def test_first_line_of_a_cut_transaction_is_its_cause(self) -> None:
        """A RollbackFailed reads as the error that made the transaction roll back."""
        cause = Failure(psycopg2.OperationalError("server closed the connection unexpectedly\n"
                                                  "\tThis probably means …"))
        self.assertEqual(first_line(Failure(RollbackFailed(None, cause))),
                         "server closed the connection unexpectedly")


class DeathTests(SynchronousTestCase):
    def test_dead_sessions(self) -> None:
        """libpq errors, class 08, shutdowns, closed sockets and failed rollbacks are deaths."""
        for error in (psycopg2.OperationalError("server closed the connection unexpectedly"),
                      psycopg2.InterfaceError("connection already closed"), Coded("08006"),
                      Coded("57P01"), ConnectionDone(), RollbackFailed(None, None)):
            self.assertTrue(is_connection_failure(Failure(error)), error)

    def test_failed_statements_are_not_deaths(self) -> None:
        """A deadlock, a lock timeout, a cancelled statement or bad data leave the session up."""
        for error in (psycopg2.errors.DeadlockDetected("deadlock"), Coded("55P03"),
                      Coded("57014"), psycopg2.DataError("invalid input")):
            self.assertFalse(is_connection_failure(Failure(error)), error)


class DoReadTests(SynchronousTestCase):
    def test_dead_socket_is_a_loss_reason_not_a_traceback(self) -> None:
        """doRead returns (never raises) what killed the connection: a server error, or the
        file descriptor -1 that txpostgres tries to register again after libpq dropped it."""
        from txpostgres import txpostgres

        from lpa.relay import pgadapter

        connection = pgadapter.Connection(reactor=object(), detector=None)
        for raised in (psycopg2.OperationalError("server closed the connection unexpectedly"),
                       ValueError("file descriptor cannot be a negative integer (-1)")):
            def do_read(self: object, raised: Exception = raised) -> None:
                raise raised

            self.patch(txpostgres.Connection, "doRead", do_read)
            reason = connection.doRead()
            self.assertTrue(is_connection_failure(Failure(reason)), reason)


class StartCheckTests(SynchronousTestCase):
    def test_unknown_database_names_everything(self) -> None:
        """A database that does not exist: one line with host, port, database, user, what to do."""
        server = pg.cluster()
        dsn = server.dsn("no_such_database")
        error = self.assertRaises(DatabaseUnreachable, check_database, dsn, where="the url")
        text = str(error)
        self.assertNotIn("\n", text)
        for part in (f"'no_such_database' at {server.socket_dir} port {server.port}",
                     "as user 'postgres'", 'database "no_such_database" does not exist',
                     "check the url"):
            self.assertIn(part, text)

    def test_connection_refused_names_host_and_port(self) -> None:
        """Nothing listening: the line says which host and port refused."""
        error = self.assertRaises(DatabaseUnreachable, check_database,
                                  "postgresql://relay@127.0.0.1:1/manager", timeout=3)
        self.assertIn("'manager' at 127.0.0.1 port 1 as user 'relay'", str(error))
        self.assertIn("Connection refused", str(error))

    def test_reachable_database_passes(self) -> None:
        """A database that answers SELECT 1 passes the check."""
        check_database(pg.cluster().dsn("postgres"))

    def test_relay_exits_69_with_one_line(self) -> None:
        """twistd lpa-relay against a database it cannot use: one line on stderr, exit 69."""
        pki = make_test_pki(self.mktemp())
        path = os.path.join(pki.directory, "relay.toml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(
                f'[database]\nurl = "{pg.cluster().dsn("wrong_name")}"\n'
                f'[security]\nagent_client_cert_path = "{pki.good.cert}"\n'
                f'agent_client_key_path = "{pki.good.key}"\nca_cert_path = "{pki.ca_cert}"\n')
        options = tap.Options()
        options.parseOptions(["--config", path])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        exit_ = self.assertRaises(SystemExit, tap.makeService, options)
        self.assertEqual(exit_.code, EXIT_DATABASE_UNREACHABLE)
        self.assertEqual(stderr.getvalue().count("\n"), 1)
        self.assertTrue(stderr.getvalue().startswith("lpa-relay: cannot connect to database "
                                                     "'wrong_name' at "))
        self.assertIn(f"[database] url of {path}", stderr.getvalue())
