"""``lpa relay status``: the relays sharing a database, their heartbeats and shares, read from it.

Everything comes from the database in one read-only transaction: the relays' rows in
``relay_members`` (heartbeat age and time to expiry by the database's clock, so no host clock is
involved), their leases in ``relay_agent_leases``, and the running rows of ``patch_job_hosts``
the leases cover.  ``--dsn`` wins; otherwise ``[database] url`` of the relay's config file.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import attr

from lpa.errors import LpaError
from lpa.relay.config import load_relay_config

_RUNNING = """
SELECT COALESCE(NULLIF(h.fqdn, ''), host(h.ip_address)) AS agent_host, h.agent_port, pjh.id
  FROM patch_job_hosts pjh JOIN hosts h ON h.id = pjh.host_id
 WHERE pjh.status = 'running'::job_status AND pjh.agent_job_id IS NOT NULL
"""

RELAYS_SQL = f"""
WITH running AS ({_RUNNING})
SELECT m.relay_id, m.hostname, m.pid, m.started_at,
       extract(epoch FROM now() - m.heartbeat_at)::float8,
       extract(epoch FROM m.expires_at - now())::float8,
       m.expires_at > now(),
       (SELECT count(*) FROM relay_agent_leases l WHERE l.relay_id = m.relay_id),
       (SELECT count(*) FROM running r JOIN relay_agent_leases l
            ON l.agent_host = r.agent_host AND l.agent_port = r.agent_port
         WHERE l.relay_id = m.relay_id)
  FROM relay_members m
 ORDER BY m.relay_id
"""

TOTALS_SQL = f"""
WITH running AS ({_RUNNING}),
     followed AS (
       SELECT r.*, (m.relay_id IS NOT NULL AND m.expires_at > now()) AS followed
         FROM running r
         LEFT JOIN relay_agent_leases l
                ON l.agent_host = r.agent_host AND l.agent_port = r.agent_port
         LEFT JOIN relay_members m ON m.relay_id = l.relay_id)
SELECT count(DISTINCT (agent_host, agent_port)),
       count(*),
       count(DISTINCT (agent_host, agent_port)) FILTER (WHERE NOT followed),
       count(*) FILTER (WHERE NOT followed),
       now()
  FROM followed
"""


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class RelayRow:
    """One relay as the database sees it."""

    relay_id: str
    hostname: str
    pid: int | None
    started_at: str
    heartbeat_age_secs: float
    expires_in_secs: float
    live: bool
    agents: int
    jobs: int


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class FleetStatus:
    """The relays and what they follow; ``jobs`` counts running host rows (patch_job_hosts)."""

    relays: tuple[RelayRow, ...]
    agents: int
    jobs: int
    unfollowed_agents: int
    unfollowed_jobs: int
    database_time: str


def read_status(connection: Any) -> FleetStatus:
    """Read the status on an open psycopg2 connection (one read-only transaction)."""
    import psycopg2

    try:
        with connection.cursor() as cursor:
            cursor.execute("BEGIN READ ONLY")
            cursor.execute(RELAYS_SQL)
            relays = tuple(
                RelayRow(
                    relay_id=relay_id,
                    hostname=hostname,
                    pid=pid,
                    started_at=started.isoformat(),
                    heartbeat_age_secs=round(age, 3),
                    expires_in_secs=round(expires, 3),
                    live=live,
                    agents=agents,
                    jobs=jobs,
                )
                for relay_id, hostname, pid, started, age, expires, live, agents, jobs in (
                    cursor.fetchall()
                )
            )
            cursor.execute(TOTALS_SQL)
            agents, jobs, lost_agents, lost_jobs, now = cursor.fetchone()
            cursor.execute("COMMIT")
    except psycopg2.errors.UndefinedTable:
        raise LpaError(
            "the database has no relay membership tables: run `lpa db migrate` once"
        ) from None
    except psycopg2.Error as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LpaError(f"cannot read the relays' status: {first}") from None
    return FleetStatus(
        relays=relays,
        agents=agents,
        jobs=jobs,
        unfollowed_agents=lost_agents,
        unfollowed_jobs=lost_jobs,
        database_time=now.isoformat(),
    )


def fleet_status(dsn: str) -> FleetStatus:
    """Connect to ``dsn`` and read the status (blocking: for the CLI and tests)."""
    import psycopg2

    try:
        connection = psycopg2.connect(dsn)
    except psycopg2.Error as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LpaError(f"cannot connect to the database: {first}") from None
    try:
        connection.autocommit = True
        return read_status(connection)
    finally:
        connection.close()


def format_status(status: FleetStatus) -> str:
    """The human table: one line per relay, then the totals."""
    lines = []
    if status.relays:
        header = ("RELAY", "STATE", "HOST", "PID", "HEARTBEAT AGE", "EXPIRES IN", "AGENTS", "JOBS")
        rows = [
            (
                relay.relay_id,
                "live" if relay.live else "expired",
                relay.hostname,
                str(relay.pid if relay.pid is not None else "-"),
                f"{relay.heartbeat_age_secs:.1f}s",
                f"{relay.expires_in_secs:.1f}s" if relay.live else "-",
                str(relay.agents),
                str(relay.jobs),
            )
            for relay in status.relays
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            lines.append("  ".join(cells).rstrip())
    else:
        lines.append("no relay is registered in this database")
    lines.append(
        f"agents with running jobs: {status.agents} "
        f"({status.agents - status.unfollowed_agents} followed, "
        f"{status.unfollowed_agents} not followed); "
        f"running host jobs: {status.jobs} ({status.unfollowed_jobs} not followed)"
    )
    return "\n".join(lines)


def add_parser(subparsers: Any) -> None:
    """Register ``lpa relay status``."""
    parser = subparsers.add_parser(
        "relay", help="see the relays sharing the database",
        description="The relays sharing the manager's database, read from the database.")
    actions = parser.add_subparsers(dest="relay_action", metavar="ACTION", required=True)
    status = actions.add_parser(
        "status", help="live relays, their heartbeats and how many agents/jobs each follows",
        description="Show each relay registered in the database: live or expired, heartbeat "
        "age and time to expiry (by the database's clock), and the agents with running jobs "
        "and running host jobs it follows; then how many nobody follows.")
    status.add_argument(
        "--dsn", help="PostgreSQL URL (default: [database] url of the config file)")
    status.add_argument(
        "--config", help="the relay's config file (default $PATCH_MANAGER_CONFIG or "
        "/etc/patch-manager/config.toml); used only without --dsn")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_main)


def _main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    dsn = args.dsn or load_relay_config(args.config).database_url
    status = fleet_status(dsn)
    if args.json:
        print(json.dumps(attr.asdict(status), sort_keys=True), file=out)
    else:
        print(format_status(status), file=out)
    return 0
