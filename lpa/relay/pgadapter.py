"""txpostgres, adapted to a daemon that must outlive PostgreSQL restarts without noise.

txpostgres 1.7 does three things a daemon cannot live with, fixed here at their source:

* An idle connection whose server goes away raises from ``doRead`` (psycopg2's ``poll()``:
  "server closed the connection unexpectedly"), and the reactor logs that as an "Unhandled
  Error" traceback, one per connection per outage.  :meth:`Connection.doRead` hands the error
  back to the reactor as the reason the descriptor is lost instead, so it reaches
  ``connectionLost`` and the dead-connection detector quietly.
* A transaction cut by a connection loss fails its ``ROLLBACK`` too, and txpostgres logs that
  with ``log.err``; :meth:`Connection._runInteraction` reports it as the transaction's failure.
* Without a :class:`Detector` a connection stays dead after a server restart
  (``InterfaceError: connection already closed``).  Ours can be stopped (no timers left behind),
  tells its owner when the connection died (``on_dead``), and declares it recovered only after
  a ``SELECT 1`` answered, so a server that accepts a connection while it shuts down does not
  count as back.

Also here: :func:`describe_dsn` (``user@host:port/database`` for log lines) and
:func:`check_database`, the blocking start-up check of ``lpa-relay``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import retrying, txpostgres
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector

from lpa.errors import LpaError

_log = Logger()

#: what ``lpa-relay`` exits with when the database cannot be reached at start (EX_UNAVAILABLE)
EXIT_DATABASE_UNREACHABLE = 69
#: how long the start-up check waits for the server (libpq ``connect_timeout``)
CHECK_TIMEOUT = 10


class DatabaseUnreachable(LpaError):
    """The database cannot be reached or refused us; ``str()`` is one sentence for operators."""


def first_line(error: BaseException | Failure) -> str:
    """The first line of an error's text (psycopg2 errors span several lines)."""
    value = error.value if isinstance(error, Failure) else error
    if isinstance(value, txpostgres.RollbackFailed):  # the error that made it roll back
        return first_line(value.originalFailure)
    text = str(value).strip()
    return text.splitlines()[0].strip() if text else type(value).__name__


def dsn_parts(dsn: str) -> dict[str, str]:
    """host, port, dbname and user a libpq connection to ``dsn`` would use (defaults filled)."""
    try:
        parsed = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        parsed = {}
    try:
        os_user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        os_user = "?"
    user = parsed.get("user") or os.environ.get("PGUSER") or os_user
    return {
        "host": parsed.get("host") or os.environ.get("PGHOST") or "/var/run/postgresql",
        "port": str(parsed.get("port") or os.environ.get("PGPORT") or 5432),
        "dbname": parsed.get("dbname") or os.environ.get("PGDATABASE") or user,
        "user": user,
    }


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` (never the password), for log lines about the database."""
    parts = dsn_parts(dsn)
    return f"{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"


def check_database(dsn: str, *, timeout: int = CHECK_TIMEOUT, where: str = "") -> None:
    """Connect once and run ``SELECT 1`` (blocking); raise :class:`DatabaseUnreachable` if not.

    The message names host, port, database and user, the server's reason, and what to do.
    ``where`` names the setting the DSN came from (e.g. "[database] url in /etc/lpa/relay.toml").
    """
    parts = dsn_parts(dsn)
    try:
        connection = psycopg2.connect(dsn, connect_timeout=timeout)
    except psycopg2.Error as error:
        raise DatabaseUnreachable(
            f"cannot connect to database {parts['dbname']!r} at {parts['host']} port "
            f"{parts['port']} as user {parts['user']!r}: {first_line(error)}; check "
            f"{where or 'the database URL'} and that PostgreSQL is running and accepts this "
            "user"
        ) from None
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()


def reconnect_delays() -> Any:
    """Reconnect at once, then back off from 0.5 s to at most 5 s (txpostgres caps at 10 s)."""
    return retrying.simpleBackoffIterator(
        initialDelay=0.5, maxDelay=5.0, factor=1.7, maxRetries=0, now=True
    )


#: SQLSTATEs that say the session is gone: class 08 (connection exception) is checked apart;
#: admin_shutdown, crash_shutdown, cannot_connect_now
_GONE_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def is_connection_failure(failure: Failure) -> bool:
    """The failure means the connection is gone (not that the statement was wrong).

    psycopg2 files many server errors under OperationalError (a deadlock, a lock timeout, a
    cancelled statement …); those leave the session usable and are not deaths.  An error without
    a SQLSTATE comes from libpq itself ("server closed the connection unexpectedly").
    """
    if failure.check(
        psycopg2.InterfaceError,
        txpostgres.RollbackFailed,
        ConnectionDead,
        ConnectionDone,
        ConnectionLost,
    ):
        return True
    if failure.check(psycopg2.extensions.TransactionRollbackError):  # deadlock, serialisation
        return False
    if failure.check(psycopg2.OperationalError):
        code = getattr(failure.value, "pgcode", None)
        return code is None or code.startswith("08") or code in _GONE_SQLSTATES
    return False


class Detector(DeadConnectionDetector):  # type: ignore[misc]  # txpostgres ships no types
    """A detector whose reconnect loop can be stopped and which reports deaths to its owner.

    ``on_dead`` (set by the owner) is called with the failure when the connection is found dead,
    once per death, before reconnecting starts.
    """

    def __init__(
        self,
        *,
        reactor: IReactorTime,
        reconnection_iterator: Callable[[], Any] = reconnect_delays,
    ) -> None:
        super().__init__(
            deathChecker=is_connection_failure,
            reconnectionIterator=reconnection_iterator,
            reactor=reactor,
        )
        self.on_dead: Callable[[Failure], None] | None = None
        self._retrying: Deferred[Any] | None = None
        self.stopped = False

    def startReconnecting(self, f: Failure) -> None:  # noqa: N802 (txpostgres hook)
        if self.stopped:
            return
        if self.on_dead is not None:
            self.on_dead(f)
        call = retrying.RetryingCall(self._attempt)
        call.reactor = self.reactor
        retrying_deferred = call.start(
            self.reconnectionIterator(),
            failureTester=lambda failure: failure if self.stopped else None,
        )
        self._retrying = retrying_deferred
        retrying_deferred.addCallbacks(self._recovered, self._gave_up)
        if self._stopped_meanwhile():  # the first attempt's callbacks stopped us (closing)
            self._cancel_retrying()

    def _stopped_meanwhile(self) -> bool:
        """Read ``stopped`` again after calls that may set it (a plain check would be narrowed)."""
        return self.stopped

    def _attempt(self) -> Deferred[Any]:
        """One reconnection: connect, then prove the server answers."""
        connected: Deferred[Any] = defer.maybeDeferred(self.reconnect)
        return connected.addCallback(self._probe)

    def reconnect(self) -> Deferred[Any]:
        """Close, then connect again; nothing once stopped (closing can call back into us)."""
        with contextlib.suppress(Exception):  # half-open: a new connection replaces it anyway
            self.reconnectable.close()
        if self.stopped:
            raise ConnectionDead("the store is closing")
        connecting: Deferred[Any] = self.reconnectable.connect(*self._connargs, **self._connkw)
        return connecting

    def _probe(self, _: object) -> Deferred[Any]:
        if self.stopped:
            raise ConnectionDead("the store is closing")
        probing: Deferred[Any] = self.reconnectable.probe()
        return probing

    def _recovered(self, _: object) -> Any:
        self._retrying = None
        if self.stopped:
            self.reconnectable.close()
            return None
        return self.connectionRecovered()

    def _gave_up(self, failure: Failure) -> None:
        self._retrying = None
        if not self.stopped:  # the loop never ends otherwise (maxRetries=0)
            _log.failure("database reconnect loop ended", failure)

    def stop(self) -> None:
        """No more reconnection attempts (the store is closing; it closes the connection next).

        A wait between attempts is cancelled; an attempt in progress cannot be (txpostgres must
        finish a poll cycle): closing the connection ends it, and then the loop.
        """
        self.stopped = True
        self._cancel_retrying()

    def _cancel_retrying(self) -> None:
        if self._retrying is not None:
            # _CancelInProgress, or psycopg2 refusing to cancel a connect
            with contextlib.suppress(Exception):
                self._retrying.cancel()


#: run on every new session: values the relay writes are compressed with lz4 where the server
#: has it (PostgreSQL 14+ built with lz4; anything else keeps its default, pglz).  Appending to a
#: job's growing output rewrites the whole TOASTed value; lz4 makes that about eight times
#: cheaper, and every reader of the database decompresses either transparently.
SESSION_SETUP = (
    "SELECT set_config('default_toast_compression', 'lz4', false) FROM pg_settings "
    "WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
)


class Transaction:
    """What a transaction body gets: statements sent in as few round trips as possible.

    ``BEGIN`` travels with the first :meth:`execute` and ``COMMIT`` with the one that says
    ``commit=True``; several statements may share a round trip (``statements`` joined by ``;``,
    their parameters in order).  Results are those of the last statement of the round trip.
    """

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.begun = False
        self.commit_sent = False

    def execute(
        self, *statements: tuple[str, tuple[Any, ...] | None], commit: bool = False
    ) -> Deferred[Any]:
        """Send ``statements`` (each ``(sql, params)``) in one round trip; fires with self."""
        texts = [sql for sql, _ in statements]
        params: list[Any] = [value for _, values in statements for value in (values or ())]
        if not self.begun:
            texts.insert(0, "BEGIN ISOLATION LEVEL READ COMMITTED")
            self.begun = True
        if commit:
            texts.append("COMMIT")
            self.commit_sent = True
        sent: Deferred[Any] = self._cursor.execute(
            "; ".join(texts), tuple(params) if params else None
        )
        return sent.addCallback(lambda _: self)

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._cursor.fetchall()
        return rows

    def fetchone(self) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._cursor.fetchone()
        return row


class Connection(txpostgres.Connection):  # type: ignore[misc]  # txpostgres ships no types
    """A txpostgres Connection that never sends a connection loss to the log as a traceback.

    ``runInteraction`` keeps txpostgres' contract (the body gets a cursor; ``BEGIN`` and
    ``COMMIT`` are round trips of their own); :meth:`runTransaction` gives the body a
    :class:`Transaction` instead, which sends them with the body's first and last statements.
    Both run READ COMMITTED whatever the server's default (the roll-up relies on each statement
    seeing what committed before it, see :mod:`lpa.relay.rollup`), and a rollback that fails on
    a dead connection reports the death instead of logging a traceback.
    """

    _closing = False

    def _runInteraction(  # noqa: N802 (txpostgres hook)
        self, interaction: Any, *args: Any, **kwargs: Any
    ) -> Deferred[Any]:
        cursor = self.cursor()
        ran: Deferred[Any] = cursor.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        ran.addCallback(lambda _: interaction(cursor, *args, **kwargs))
        ran.addCallback(lambda result: cursor.execute("COMMIT").addCallback(lambda _: result))
        return ran.addErrback(self._rollback, cursor)

    def runTransaction(self, body: Callable[[Transaction], Any]) -> Deferred[Any]:  # noqa: N802
        """Run ``body(transaction)`` in one transaction (see :class:`Transaction`)."""
        done: Deferred[Any] = self._doit(self._runTransaction, body)
        return done

    def _runTransaction(self, body: Callable[[Transaction], Any]) -> Deferred[Any]:  # noqa: N802
        cursor = self.cursor()
        tx = Transaction(cursor)
        ran = defer.maybeDeferred(body, tx)

        def commit(result: Any) -> Any:
            if not tx.begun or tx.commit_sent:
                return result
            return cursor.execute("COMMIT").addCallback(lambda _: result)

        def rollback(failure: Failure) -> Any:
            if not tx.begun:
                return failure
            return self._rollback(failure, cursor)

        return ran.addCallback(commit).addErrback(rollback)

    def _rollback(self, failure: Failure, cursor: Any) -> Deferred[Any]:
        undone = defer.maybeDeferred(cursor.execute, "ROLLBACK")
        # a connection that died mid-transaction cannot roll back: report the death itself
        undone.addErrback(lambda _: Failure(txpostgres.RollbackFailed(self, failure)))
        return undone.addCallback(lambda _: failure)

    def doRead(self) -> Any:
        """Read NOTIFYs or a server error; a dead socket becomes this descriptor's loss reason.

        Returning the error (instead of raising it) makes the reactor call ``connectionLost``
        with it without logging a traceback; ``connectionLost`` tells the detector.  libpq may
        also have dropped the socket before psycopg2 says the connection is closed: txpostgres
        then registers file descriptor -1 again (``ValueError``), which is the same death.
        """
        try:
            super().doRead()
        except psycopg2.Error as error:
            return error
        except (ValueError, OSError) as error:
            return ConnectionLost(f"the database connection's socket is gone ({error})")
        return None

    def connectionLost(self, reason: Failure) -> None:
        if self._closing:  # our own close(): not a death to report
            txpostgres._PollingMixin.connectionLost(self, reason)
            return
        super().connectionLost(reason)

    def close(self) -> None:
        if self._connection is None:
            return
        self._closing = True
        try:
            super().close()
        finally:
            self._closing = False

    def connect(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Connect, then set the session up (see :data:`SESSION_SETUP`)."""
        connected: Deferred[Any] = super().connect(*args, **kwargs)

        def setup(result: Any) -> Any:
            return self.cursor().execute(SESSION_SETUP).addCallback(lambda _: result)

        return connected.addCallback(setup)

    def probe(self) -> Deferred[Any]:
        """``SELECT 1`` on the (re)connected socket, outside the detector's checks."""
        answered: Deferred[Any] = self.cursor().execute("SELECT 1")
        return answered


def connection_factory(reactor: Any, clock: IReactorTime) -> Callable[[], Connection]:
    """Unconnected :class:`Connection` objects, each with its own :class:`Detector`."""

    def make() -> Connection:
        return Connection(reactor=reactor, detector=Detector(reactor=clock))

    return make
