"""The membership tables (``lpa/sql/003_relay_membership.sql``) on connections of their own.

A heartbeat must never queue behind event writes, nor behind a rebalance, so membership has two
txpostgres connections of its own (each with the store's dead-connection detector: they
reconnect after a server restart): one for heartbeats (and leaving), one for rebalances and the
LISTEN that wakes them.  Every time is the database's ``now()``; no host clock is compared with
another::

    heartbeat   INSERT … ON CONFLICT (relay_id) DO UPDATE SET expires_at = now() + ttl
                  WHERE it is our incarnation, or the old row expired    (one round trip)
    rebalance   BEGIN
                pg_try_advisory_xact_lock(CLAIM_LOCK)          busy → owned only, retry soon
                DELETE expired relays                          (their leases cascade)
                DELETE leases of agents without running jobs
                count agents, live relays, our leases → target = ceil(agents / relays)
                shed our newest leases above the target, or claim unleased agents up to it
                pg_notify('lpa_relay_members') if anything moved
                SELECT our leases
                COMMIT

The advisory lock serialises rebalances: each one counts and claims on a consistent picture,
no two relays claim the same agent at the same moment, and concurrent claims cannot deadlock.
The lease's primary key keeps ownership exclusive even so.  A try-lock, never a wait: a relay
stuck in its transaction cannot hold the others' heartbeats (which are separate statements)
or make them time out; ``idle_in_transaction_session_timeout`` ends such a session.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

import psycopg2.errors
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.errors import LpaError
from lpa.relay.interfaces import AgentAddress
from lpa.relay.membership import IMembershipDatabase, Rebalance, RelayIdInUse
from lpa.relay.store import default_connection_factory

_log = Logger()

CHANNEL = "lpa_relay_members"
#: pg_advisory_xact_lock key of the rebalance ("lpa_rela" in ASCII)
CLAIM_LOCK = 0x6C70615F72656C61

#: the agents with running jobs, as the relay dials them (the store's running_host_jobs shape)
RUNNING_AGENTS_SQL = """
SELECT DISTINCT COALESCE(NULLIF(h.fqdn, ''), host(h.ip_address)) AS agent_host,
       h.agent_port AS agent_port
  FROM patch_job_hosts pjh JOIN hosts h ON h.id = pjh.host_id
 WHERE pjh.status = 'running'::job_status AND pjh.agent_job_id IS NOT NULL
"""

_HEARTBEAT_SQL = """
INSERT INTO relay_members AS m
       (relay_id, incarnation, hostname, pid, started_at, heartbeat_at, expires_at)
VALUES (%(relay_id)s, %(incarnation)s, %(hostname)s, %(pid)s, now(), now(),
        now() + %(ttl)s * interval '1 second')
ON CONFLICT (relay_id) DO UPDATE
   SET incarnation = EXCLUDED.incarnation, hostname = EXCLUDED.hostname, pid = EXCLUDED.pid,
       started_at = CASE WHEN m.incarnation = EXCLUDED.incarnation
                         THEN m.started_at ELSE now() END,
       heartbeat_at = now(), expires_at = EXCLUDED.expires_at
 WHERE m.incarnation = EXCLUDED.incarnation OR m.expires_at <= now()
RETURNING m.started_at = m.heartbeat_at
"""

_HOLDER_SQL = "SELECT hostname, pid FROM relay_members WHERE relay_id = %s"

_COUNTS_SQL = f"""
SELECT (SELECT count(*) FROM ({RUNNING_AGENTS_SQL}) r),
       (SELECT count(*) FROM relay_members WHERE expires_at > now()),
       (SELECT count(*) FROM relay_agent_leases WHERE relay_id = %(relay_id)s)
"""

_DROP_IDLE_LEASES_SQL = f"""
DELETE FROM relay_agent_leases l
 WHERE NOT EXISTS (SELECT 1 FROM ({RUNNING_AGENTS_SQL}) r
                    WHERE r.agent_host = l.agent_host AND r.agent_port = l.agent_port)
"""

#: the most recently claimed go first: long-held agents stay where they are
_SHED_SQL = """
DELETE FROM relay_agent_leases
 WHERE (agent_host, agent_port) IN (
       SELECT agent_host, agent_port FROM relay_agent_leases WHERE relay_id = %(relay_id)s
        ORDER BY claimed_at DESC, agent_host DESC, agent_port DESC LIMIT %(count)s)
"""

_CLAIM_SQL = f"""
INSERT INTO relay_agent_leases (agent_host, agent_port, relay_id)
SELECT r.agent_host, r.agent_port, %(relay_id)s FROM ({RUNNING_AGENTS_SQL}) r
 WHERE NOT EXISTS (SELECT 1 FROM relay_agent_leases l
                    WHERE l.agent_host = r.agent_host AND l.agent_port = r.agent_port)
 ORDER BY r.agent_host, r.agent_port LIMIT %(count)s
ON CONFLICT (agent_host, agent_port) DO NOTHING
"""

_OWNED_SQL = "SELECT agent_host, agent_port FROM relay_agent_leases WHERE relay_id = %s"


class MembershipTablesMissing(LpaError):
    """``lpa/sql/003_relay_membership.sql`` was never applied to this database."""


def _owned(rows: list[tuple[str, int]]) -> frozenset[AgentAddress]:
    return frozenset(AgentAddress(host=host, port=int(port)) for host, port in rows)


async def rebalance_in(cursor: Any, relay_id: str) -> Rebalance:
    """The rebalance transaction's body (``cursor``: a txpostgres Cursor inside BEGIN)."""
    await cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", (CLAIM_LOCK,))
    if not cursor.fetchone()[0]:
        await cursor.execute(_OWNED_SQL, (relay_id,))
        return Rebalance(owned=_owned(cursor.fetchall()), busy=True)
    await cursor.execute("DELETE FROM relay_members WHERE expires_at <= now() RETURNING relay_id")
    expired = tuple(sorted(row[0] for row in cursor.fetchall() if row[0] != relay_id))
    await cursor.execute(_DROP_IDLE_LEASES_SQL)
    await cursor.execute(_COUNTS_SQL, {"relay_id": relay_id})
    agents, members, mine = (int(value) for value in cursor.fetchone())
    target = math.ceil(agents / max(1, members))
    shed = claimed = 0
    if mine > target:
        await cursor.execute(_SHED_SQL, {"relay_id": relay_id, "count": mine - target})
        shed = cursor.rowcount
    elif mine < target:
        await cursor.execute(_CLAIM_SQL, {"relay_id": relay_id, "count": target - mine})
        claimed = cursor.rowcount
    if shed or expired:
        await cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, relay_id))
    await cursor.execute(_OWNED_SQL, (relay_id,))
    return Rebalance(
        owned=_owned(cursor.fetchall()),
        agents=agents,
        members=members,
        target=target,
        claimed=claimed,
        shed=shed,
        expired=expired,
    )


@implementer(IMembershipDatabase)
class PostgresMembershipDatabase:
    """:class:`~lpa.relay.membership.IMembershipDatabase` on one txpostgres connection.

    :param connection_factory: makes an unconnected txpostgres Connection with a ``detector``;
        default the store's :func:`~lpa.relay.store.default_connection_factory`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        relay_id: str,
        lease_ttl: float,
        clock: IReactorTime,
        reactor: Any,
        connection_factory: Callable[[], Any] | None = None,
    ) -> None:
        self._dsn = dsn
        self.relay_id = relay_id
        self.incarnation = str(uuid.uuid4())
        self._ttl = lease_ttl
        make = connection_factory or default_connection_factory(reactor, clock)
        self._beats = make()  # heartbeats and leave: one short statement each
        self._work = make()  # rebalances, and the LISTEN that wakes them
        self._wakeup: Callable[[], None] | None = None
        self._closed = False

    # -- connections ------------------------------------------------------------------------

    def connect(self) -> Deferred[None]:
        self._work.addNotifyObserver(self._notified)
        for connection in (self._beats, self._work):
            connection.detector.addRecoveryHandler(
                lambda connection=connection: self._session_setup(connection)
            )
        return gatherResults(
            [self._connect(self._beats), self._connect(self._work)], consumeErrors=True
        ).addCallback(lambda _: None)

    def _connect(self, connection: Any) -> Deferred[Any]:
        # a hung server must not keep us believing we are alive: libpq gives up on unanswered
        # TCP within the fence (no effect on unix sockets)
        connecting: Deferred[Any] = connection.connect(
            self._dsn,
            keepalives=1,
            keepalives_idle=max(1, int(self._ttl / 4)),
            keepalives_interval=1,
            keepalives_count=3,
            tcp_user_timeout=max(1000, int(self._ttl * 500)),
        )
        connecting.addCallback(lambda _: self._session_setup(connection))

        def failed(failure: Failure) -> None:
            name = type(failure.value).__name__
            first = (str(failure.value).strip().splitlines() or [name])[0]
            _log.warn("membership database connection failed: {reason}", reason=first)
            connection.detector.checkForDeadConnection(failure)

        return connecting.addErrback(failed)

    def _session_setup(self, connection: Any) -> Deferred[Any] | None:
        """After every (re)connection: bound idle transactions; LISTEN for other relays."""
        if self._closed:
            return None
        idle_ms = max(1000, int(self._ttl * 1000))
        statements = f"SET idle_in_transaction_session_timeout = {idle_ms}"
        if connection is self._work:
            statements += f"; LISTEN {CHANNEL}"
        setup: Deferred[Any] = connection.runOperation(statements)
        return setup.addErrback(
            lambda failure: _log.warn(
                "membership session set-up failed: {reason}", reason=failure.getErrorMessage()
            )
        )

    def set_wakeup(self, callback: Callable[[], None]) -> None:
        self._wakeup = callback

    def _notified(self, notify: Any) -> None:
        if notify.channel == CHANNEL and notify.payload != self.relay_id and self._wakeup:
            self._wakeup()

    def close(self) -> None:
        self._closed = True
        for connection in (self._beats, self._work):
            stop_reconnecting = getattr(connection.detector, "stop", None)
            if stop_reconnecting is not None:
                stop_reconnecting()
            with contextlib.suppress(Exception):  # never connected, or already gone
                connection.close()

    # -- IMembershipDatabase ----------------------------------------------------------------

    def heartbeat(self) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._heartbeat())

    async def _heartbeat(self) -> bool:
        try:
            rows = await self._heartbeat_query()
        except psycopg2.errors.UndefinedTable:
            raise MembershipTablesMissing(
                "the database has no relay_members table: run `lpa db migrate` once"
            ) from None
        if not rows:
            holder = await self._beats.runQuery(_HOLDER_SQL, (self.relay_id,))
            where = f"{holder[0][0]} pid {holder[0][1]}" if holder else "another process"
            raise RelayIdInUse(f"registered by {where}")
        joined = bool(rows[0][0])
        if joined:
            await self._beats.runQuery("SELECT pg_notify(%s, %s)", (CHANNEL, self.relay_id))
        return joined

    def _heartbeat_query(self) -> Deferred[list[tuple[Any, ...]]]:
        rows: Deferred[list[tuple[Any, ...]]] = self._beats.runQuery(
            _HEARTBEAT_SQL,
            {
                "relay_id": self.relay_id,
                "incarnation": self.incarnation,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "ttl": self._ttl,
            },
        )
        return rows

    def rebalance(self) -> Deferred[Rebalance]:
        rebalanced: Deferred[Rebalance] = self._work.runInteraction(
            lambda cursor: Deferred.fromCoroutine(rebalance_in(cursor, self.relay_id))
        )
        return rebalanced

    def leave(self) -> Deferred[object]:
        left: Deferred[object] = self._beats.runQuery(
            "WITH gone AS (DELETE FROM relay_members WHERE relay_id = %s AND incarnation = %s "
            "RETURNING relay_id) SELECT pg_notify(%s, relay_id) FROM gone",
            (self.relay_id, self.incarnation, CHANNEL),
        )
        return left
