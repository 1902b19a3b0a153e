"""Blocking helpers for PostgreSQL tests: seed manager-shaped rows, read them, LISTEN.

They use a plain psycopg2 connection (not the store under test), so what they see is what any
other client of the database would see.
"""

from __future__ import annotations

import json
import select
import time
from typing import Any, ClassVar

import psycopg2
from twisted.trial.unittest import TestCase

from lpa.events import JobEvent
from lpa.relay.interfaces import AgentAddress, HostJob
from tests import pg


class Seeder:
    """Insert hosts, jobs and host rows; query rows back."""

    def __init__(self, dsn: str) -> None:
        self.connection = psycopg2.connect(dsn)
        self.connection.autocommit = True

    def close(self) -> None:
        self.connection.close()

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()

    def all(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)

    def host(self, fqdn: str, ip: str = "192.0.2.10", port: int = 12443) -> str:
        host_id: str = self.one(
            "INSERT INTO hosts (fqdn, ip_address, agent_port) VALUES (%s, %s, %s) "
            "RETURNING id::text",
            (fqdn, ip, port),
        )[0]
        return host_id

    def job(self, status: str = "running") -> str:
        job_id: str = self.one(
            "INSERT INTO patch_jobs (status) VALUES (%s::job_status) RETURNING id::text", (status,)
        )[0]
        return job_id

    def host_job(
        self,
        job_id: str,
        host_id: str,
        agent_job_id: str | None,
        status: str = "running",
        address: str = "",
        port: int = 12443,
    ) -> HostJob:
        row_id = self.one(
            "INSERT INTO patch_job_hosts (job_id, host_id, status, agent_job_id) "
            "VALUES (%s, %s, %s::job_status, %s) RETURNING id::text",
            (job_id, host_id, status, agent_job_id),
        )[0]
        return HostJob(
            row_id=row_id,
            job_id=job_id,
            host_id=host_id,
            agent_job_id=agent_job_id or "",
            agent=AgentAddress(host=address or "unused", port=port),
        )

    def row(self, row_id: str) -> dict[str, Any]:
        with self.connection.cursor() as cursor:
            cursor.execute(
                "SELECT status::text, output, error_message, completed_at, relay_last_seq, "
                "relay_agent_job_id, relay_transport, relay_last_event_at, relay_progress, "
                "relay_message FROM patch_job_hosts WHERE id = %s",
                (row_id,),
            )
            assert cursor.description is not None
            names = [column.name for column in cursor.description]
            values = cursor.fetchone()
            assert values is not None, f"no patch_job_hosts row {row_id}"
            return dict(zip(names, values, strict=True))

    def job_status(self, job_id: str) -> str:
        status: str = self.one("SELECT status::text FROM patch_jobs WHERE id = %s", (job_id,))[0]
        return status


class DeadlineRowCase(TestCase):
    """A migrated database of its own with one running row (``self.row``, agent job ``job-1``)
    for a relay deadline record that keeps its start in the column :attr:`since`; no tests."""

    since: ClassVar[str]

    def setUp(self) -> None:
        self.dsn = pg.database(self, migrated=True)
        self.seed = Seeder(self.dsn)
        self.addCleanup(self.seed.close)
        self.row = self.seed.host_job(
            self.seed.job(), self.seed.host("agent1.example"), "job-1").row_id

    def age(self, seconds: int) -> None:
        """Pretend the recorded start (the first JOB_NOT_FOUND or failed poll) was ``seconds``
        ago."""
        self.seed.execute(
            f"UPDATE patch_job_hosts SET {self.since} = now() - make_interval(secs => %s) "
            "WHERE id = %s", (seconds, self.row))


class Listener:
    """A separate session that LISTENs on ``job_update`` and collects payloads."""

    def __init__(self, dsn: str, channel: str = "job_update") -> None:
        self.connection = psycopg2.connect(dsn)
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            cursor.execute(f"LISTEN {channel}")
        self.received: list[dict[str, Any]] = []
        self.raw: list[str] = []

    def close(self) -> None:
        self.connection.close()

    def collect(
        self, expected: int, timeout: float = 5.0, settle: float = 0.2
    ) -> list[dict[str, Any]]:
        """Wait for ``expected`` payloads in total (then ``settle`` s more for extras)."""
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            if len(self.received) >= expected and settle_until is None:
                settle_until = now + settle
            limit = settle_until if settle_until is not None else deadline
            if now >= limit:
                return self.received
            select.select([self.connection], [], [], limit - now)
            self.connection.poll()
            while self.connection.notifies:
                note = self.connection.notifies.pop(0)
                self.raw.append(note.payload)
                self.received.append(json.loads(note.payload))


def event(
    agent_job_id: str,
    seq: int | None,
    status: str,
    *,
    kind: str = "status",
    message: str = "",
    progress: int = 0,
    error: str | None = None,
    output: str | None = None,
) -> JobEvent:
    return JobEvent(
        job_id=agent_job_id,
        seq=seq,
        status=status,
        progress=progress,
        message=message,
        timestamp="2026-11-25T20:00:00+00:00",
        kind=kind,
        error=error,
        output=output,
    )
