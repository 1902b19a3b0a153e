"""Where the relay records when an agent first said it does not know a row's job.

:class:`~lpa.relay.missing.MissingJobs` keeps the first JOB_NOT_FOUND time in memory and, through
an :class:`IMissingRecord`, in the row itself (``relay_missing_since``, added by
``lpa/sql/004_relay_deadline.sql``), so the deadline keeps counting across a relay restart or a
take-over by another relay::

    mark(row, agent job)  ──▶ UPDATE … SET relay_missing_since = COALESCE(kept, now())
                              RETURNING now() - relay_missing_since   (seconds, database clock)
    clear(row)            ──▶ UPDATE … SET relay_missing_since = NULL

A kept time is restarted when the row belongs to another agent job now, or when the relay
applied an event to the row after it (the agent knew the job again meanwhile).

These writes are rare (once per row when an agent forgets a job), so each one opens its own
short connection in a thread: no pool to keep alive, nothing to reconnect after a database
restart, and a failure is just a failed call (the caller then counts from its own clock).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import Interface, implementer

CONNECT_TIMEOUT_SECONDS = 5

_MARK_SQL = """
UPDATE patch_job_hosts
   SET relay_missing_since = CASE
         WHEN relay_missing_since IS NULL
           OR relay_missing_agent_job_id IS DISTINCT FROM agent_job_id
           OR relay_last_event_at > relay_missing_since
         THEN now() ELSE relay_missing_since END,
       relay_missing_agent_job_id = agent_job_id
 WHERE id = %s AND agent_job_id = %s AND status = 'running'::job_status
RETURNING EXTRACT(EPOCH FROM now() - relay_missing_since)::float8
"""

_CLEAR_SQL = """
UPDATE patch_job_hosts SET relay_missing_since = NULL, relay_missing_agent_job_id = NULL
 WHERE id = %s AND relay_missing_since IS NOT NULL
"""


class IMissingRecord(Interface):
    """The durable side of the JOB_NOT_FOUND deadline."""

    def mark(row_id: str, agent_job_id: str) -> Deferred[float]:
        """Record (or keep) the first time; fire with the seconds since it (0.0 if just now)."""

    def clear(row_id: str) -> Deferred[None]:
        """The agent knows the job again: forget the time; fire with None."""


@implementer(IMissingRecord)
class PostgresMissingRecord:
    """:class:`IMissingRecord` on ``patch_job_hosts``; one short connection per call.

    :param connect: ``connect(dsn, connect_timeout=…)`` (``psycopg2.connect``; tests inject).
    """

    def __init__(
        self, dsn: str, *, reactor: Any, connect: Callable[..., Any] | None = None
    ) -> None:
        self._dsn = dsn
        self._reactor = reactor
        if connect is None:
            import psycopg2

            connect = psycopg2.connect
        self._connect = connect

    def _run(self, sql: str, params: tuple[str, ...]) -> Any:
        connection = self._connect(self._dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchone() if cursor.description is not None else None
        finally:
            connection.close()

    def _in_thread(self, sql: str, params: tuple[str, ...]) -> Deferred[Any]:
        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._run, sql, params
        )

    def mark(self, row_id: str, agent_job_id: str) -> Deferred[float]:
        marking = self._in_thread(_MARK_SQL, (row_id, agent_job_id))
        return marking.addCallback(lambda row: float(row[0]) if row else 0.0)

    def clear(self, row_id: str) -> Deferred[None]:
        return self._in_thread(_CLEAR_SQL, (row_id,)).addCallback(lambda _: None)


def first_line(error: BaseException | None) -> str:
    """The first line of a database error (psycopg2 messages span several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
