"""Where the relay records when an agent first said it does not know a row's job (and when
its agent first stopped answering).

:class:`~lpa.relay.missing.MissingJobs` keeps the first JOB_NOT_FOUND time in memory and, through
an :class:`IMissingRecord`, in the row itself (``relay_missing_since``, added by
``lpa/sql/004_relay_deadline.sql``), so the deadline keeps counting across a relay restart or a
take-over by another relay::

    mark(row, agent job)  ──▶ UPDATE … SET relay_missing_since = COALESCE(kept, now())
                              RETURNING now() - relay_missing_since   (seconds, database clock)
    clear(row)            ──▶ UPDATE … SET relay_missing_since = NULL

A kept time is restarted when the row belongs to another agent job now, or when the relay
applied an event to the row after it (the agent knew the job again meanwhile).  It is cleared
when the agent shows it knows the job again, and also by the first answer showing the job that
an agent link gets for the row, even if that link never saw the job missing: an agent can know
a job again without a new event (so without restarting the time above) and forget it much
later, and a time an earlier relay (or link) left must not end the row at once then.

:class:`PostgresUnreachableRecord` is the same record for the unreachable deadline of
:class:`~lpa.relay.poller.AgentPoller` (``relay_unreachable_since``, added by
``lpa/sql/005_relay_unreachable.sql``): "the agent knew the job again" is there "the agent
answered again", and the same rule clears it: the first answer a poller gets for the row.

These writes are rare (once per row when an agent forgets a job or stops answering, and once
per row when a link or poller first hears its agent, to clear a time an earlier relay left), so
each one opens its own short connection in a thread: no pool to keep alive, nothing to
reconnect after a database restart, and a failure is just a failed call (the caller logs one
warning and counts from its own clock).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import Interface, implementer

CONNECT_TIMEOUT_SECONDS = 5


def _mark_sql(since: str, agent_job: str) -> str:
    return f"""
UPDATE patch_job_hosts
   SET {since} = CASE
         WHEN {since} IS NULL
           OR {agent_job} IS DISTINCT FROM agent_job_id
           OR relay_last_event_at > {since}
         THEN now() ELSE {since} END,
       {agent_job} = agent_job_id
 WHERE id = %s AND agent_job_id = %s AND status = 'running'::job_status
RETURNING EXTRACT(EPOCH FROM now() - {since})::float8
"""


def _clear_sql(since: str, agent_job: str) -> str:
    return f"""
UPDATE patch_job_hosts SET {since} = NULL, {agent_job} = NULL
 WHERE id = %s AND {since} IS NOT NULL
"""


class IMissingRecord(Interface):
    """The durable side of a deadline: the JOB_NOT_FOUND one, or the unreachable one."""

    def mark(row_id: str, agent_job_id: str) -> Deferred[float]:
        """Record (or keep) the first time; fire with the seconds since it (0.0 if just now)."""

    def clear(row_id: str) -> Deferred[None]:
        """The agent knows the job again: forget the time; fire with None."""


@implementer(IMissingRecord)
class PostgresMissingRecord:
    """:class:`IMissingRecord` on ``patch_job_hosts``; one short connection per call.

    :param connect: ``connect(dsn, connect_timeout=…)`` (``psycopg2.connect``; tests inject).
    """

    _mark = _mark_sql("relay_missing_since", "relay_missing_agent_job_id")
    _clear = _clear_sql("relay_missing_since", "relay_missing_agent_job_id")

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
        marking = self._in_thread(self._mark, (row_id, agent_job_id))
        return marking.addCallback(lambda row: float(row[0]) if row else 0.0)

    def clear(self, row_id: str) -> Deferred[None]:
        return self._in_thread(self._clear, (row_id,)).addCallback(lambda _: None)


class PostgresUnreachableRecord(PostgresMissingRecord):
    """The same record for the unreachable deadline, in ``relay_unreachable_since`` (005)."""

    _mark = _mark_sql("relay_unreachable_since", "relay_unreachable_agent_job_id")
    _clear = _clear_sql("relay_unreachable_since", "relay_unreachable_agent_job_id")


def first_line(error: BaseException | None) -> str:
    """The first line of a database error (psycopg2 messages span several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
