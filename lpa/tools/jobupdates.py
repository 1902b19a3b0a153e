"""Following one dispatched job through ``pg_notify('job_update', …)``: ``lpa dispatch --watch``.

::

    listen(connection)        LISTEN job_update, before the agents are called
    watch_job(...)            the reactor watches the connection's socket (NotificationReader);
                              each notification of this job: a host line (at most one per
                              ``output_interval`` when only output changed), until the job-level
                              one; every ``recheck_interval`` without one, the parent row is read

This is psycopg2's own asynchronous-notification recipe with the reactor in place of ``select``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from twisted.internet import defer
from twisted.internet.defer import DeferredQueue
from twisted.internet.interfaces import IReactorTime, IReadDescriptor
from zope.interface import implementer

from lpa.errors import LpaError
from lpa.relay import notify


class DispatchError(LpaError):
    """Bad arguments, a database error or a failed watch; ``str()`` is one line."""


def listen(connection: Any) -> None:
    """Put an autocommit connection in LISTEN job_update (do this BEFORE starting agents)."""
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"LISTEN {notify.CHANNEL}")


def job_status(connection: Any, job_id: str) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT status::text FROM patch_jobs WHERE id = %s", (job_id,))
        row = cursor.fetchone()
    return None if row is None else row[0]


def host_line(payload: Mapping[str, Any], names: Mapping[str, str]) -> str:
    """One progress line for a host-level payload."""
    host = names.get(str(payload.get("host_id")), str(payload.get("host_id")))
    parts = [f"{host}: {payload.get('status')}"]
    if payload.get("progress") is not None:
        parts.append(f"{payload['progress']}%")
    if payload.get("seq") is not None:
        parts.append(f"seq={payload['seq']}")
    if payload.get("transport"):
        parts.append(f"via {payload['transport']}")
    if payload.get("error_message"):
        parts.append(f"error: {payload['error_message']}")
    elif payload.get("output"):
        lines = [line for line in str(payload["output"]).splitlines() if line.strip()]
        if lines:
            parts.append(f"| {lines[-1][:100]}")
    return " ".join(parts)


def job_line(payload: Mapping[str, Any]) -> str:
    return (f"job {payload.get('job_id')} {payload.get('status')}: "
            f"{payload.get('succeeded_count')} succeeded, {payload.get('failed_count')} failed"
            f" of {payload.get('host_count')} hosts")


@implementer(IReadDescriptor)
class NotificationReader:
    """Hands every notification of a LISTENing psycopg2 connection to ``deliver`` when the
    reactor sees the connection's socket readable (an exception when the connection broke)."""

    def __init__(self, connection: Any, deliver: Callable[[Any], None]) -> None:
        self._connection = connection
        self._deliver = deliver
        #: our own descriptor of the socket: psycopg2 closes its one when the connection
        #: breaks, and the reactor must still be able to forget ours
        self._fd = os.dup(connection.fileno())
        self._broken = False

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Close our descriptor (after the reactor stopped watching it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def doRead(self) -> None:
        if self._broken:
            return
        try:
            notes = _drain(self._connection)
        except Exception as error:  # psycopg2.OperationalError: the server went away
            self._broken = True
            self._deliver(error)
            return
        for note in notes:
            self._deliver(note)

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "job_update"


async def watch_job(
    connection: Any, job_id: str, out: TextIO, *, reactor: Any,
    clock: IReactorTime | None = None, names: Mapping[str, str] | None = None,
    timeout: float = 300.0, recheck_interval: float = 5.0,
    monotonic: Callable[[], float] | None = None,
    on_payload: Callable[[dict[str, Any]], None] | None = None,
    on_idle: Callable[[], None] | None = None,
    output_interval: float = 1.0,
) -> dict[str, Any]:
    """Print this job's notifications until the job-level one; return that payload.

    A host line is printed when the host's status, progress or error changes, and otherwise (a
    job's output lines each notify) at most every ``output_interval`` seconds, with the latest
    output line.

    ``connection`` must already LISTEN (:func:`listen`); ``reactor`` watches its socket.  Every
    ``recheck_interval`` without a notification the parent row is read, so a notification lost
    (e.g. the listener reconnected) ends the watch too, with a payload marked
    ``"recovered": true``; ``on_idle`` is called then as well (the demo checks that its daemons
    still run; it may raise).  Raises :class:`DispatchError` after ``timeout`` seconds.
    """
    clock = reactor if clock is None else clock
    now = clock.seconds if monotonic is None else monotonic
    names = names or {}
    deadline = clock.seconds() + timeout
    shown: dict[str, tuple[Any, ...]] = {}  # host_id -> what its last printed line said
    shown_at: dict[str, float] = {}  # host_id -> when it was printed
    queue: DeferredQueue[Any] = DeferredQueue()
    reader = NotificationReader(connection, queue.put)
    reader.doRead()  # what arrived before we started watching the socket
    reactor.addReader(reader)
    try:
        while True:
            remaining = deadline - clock.seconds()
            if remaining <= 0:
                raise DispatchError(
                    f"job {job_id} had no job-level notification after {timeout:g} s "
                    f"(status {job_status(connection, job_id)}; is lpa-relay running?)")
            try:
                note = await queue.get().addTimeout(min(remaining, recheck_interval), clock)
            except defer.TimeoutError:
                if on_idle is not None:
                    on_idle()
                status = job_status(connection, job_id)
                if status in ("succeeded", "failed", "cancelled"):
                    payload = _recovered_payload(connection, job_id, status)
                    out.write(job_line(payload) + " (read from the database)\n")
                    return payload
                continue
            if isinstance(note, Exception):
                raise DispatchError(f"the database connection was lost while watching job "
                                    f"{job_id}: {str(note).strip()}")
            try:
                payload = json.loads(note.payload)
            except ValueError:
                continue
            if not isinstance(payload, dict) or payload.get("job_id") != job_id:
                continue
            if on_payload is not None:
                on_payload(payload)
            if payload.get("event_type") == notify.EVENT_JOB:
                out.write(job_line(payload) + "\n")
                out.flush()
                return payload
            host = str(payload.get("host_id"))
            key = (payload.get("status"), payload.get("progress"), payload.get("error_message"))
            when = now()
            if shown.get(host) == key and when - shown_at.get(host, when) < output_interval:
                continue  # only output changed, and we showed this host a moment ago
            shown[host], shown_at[host] = key, when
            out.write(host_line(payload, names) + "\n")
            out.flush()
    finally:
        reactor.removeReader(reader)
        reader.close()


def _drain(connection: Any) -> list[Any]:
    connection.poll()
    notes = list(connection.notifies)
    del connection.notifies[:]
    return notes


def _recovered_payload(connection: Any, job_id: str, status: str) -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT status::text FROM patch_job_hosts WHERE job_id = %s", (job_id,))
        statuses = [s for (s,) in cursor.fetchall()]
    return {"event_type": notify.EVENT_JOB, "job_id": job_id, "status": status,
            "succeeded_count": statuses.count("succeeded"),
            "failed_count": statuses.count("failed"), "host_count": len(statuses),
            "recovered": True}
