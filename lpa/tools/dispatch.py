"""``lpa dispatch``: what a patch manager does to start a patch job on some hosts.

::

    one transaction:  upsert hosts ─▶ INSERT patch_jobs (running) ─▶ patch_job_hosts (pending)
    per host:         POST /api/v1/patches/apply ─▶ 202 job_id ─▶ row running + agent_job_id
                                                 └▶ error    ─▶ row failed (+ roll-up, notify)
    --watch:          LISTEN job_update (opened BEFORE the agents are called) and print each
                      host payload of this job until the job-level one (lpa.tools.jobupdates)

The relay (``lpa-relay``) picks the ``running`` rows up on its next scan and carries every agent
event into them.  A host whose agent refuses the job is marked ``failed`` here, with the same
parent roll-up rule and the same notification the relay uses, taken under the same row lock on the
parent so that exactly one job-level notification fires however the hosts end.

It runs on the reactor: the agents are called concurrently through the treq client of
:mod:`lpa.tools.client`, and ``--watch`` reads the LISTEN connection when the reactor says its
socket is readable (:mod:`lpa.tools.jobupdates`).  The SQL statements stay synchronous psycopg2
calls: each is one short transaction on a connection nothing else uses, issued once per host.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import attr
from twisted.internet.defer import Deferred

from lpa.relay import notify
from lpa.relay.rows import rollup_status
from lpa.tools import runner
from lpa.tools.client import AgentClient, AgentUrl, ClientError, Credentials, make_http_client
from lpa.tools.jobupdates import DispatchError, listen, watch_job

DEFAULT_AGENT_PORT = 12443


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HostTarget:
    """One ``--host NAME[:PORT]``: the name the agent's certificate carries, its address, port."""

    fqdn: str
    ip_address: str
    port: int = DEFAULT_AGENT_PORT


def _resolve(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise DispatchError(f"--host {name}: cannot resolve: {error.strerror}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first, as the manager stores
    return str(infos[0][4][0])


def parse_host(text: str, resolve: Callable[[str], str] = _resolve) -> HostTarget:
    """``NAME``, ``NAME:PORT``, ``[IPv6]:PORT``; the address is resolved now (hosts needs one)."""
    name, port_text = text, ""
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        name, port_text = text.split(":")
    if not name:
        raise DispatchError(f"--host {text!r}: empty host name")
    port = DEFAULT_AGENT_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise DispatchError(f"--host {text!r}: bad port {port_text!r}")
        port = int(port_text)
    return HostTarget(name, resolve(name), port)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HostRow:
    """One ``patch_job_hosts`` row created by :func:`create_job`."""

    row_id: str
    host_id: str
    target: HostTarget


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CreatedJob:
    job_id: str
    hosts: tuple[HostRow, ...]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StartResult:
    """How one host's start went: ``agent_job_id`` on success, else ``error``."""

    row: HostRow
    agent_job_id: str | None = None
    error: str | None = None


def create_job(
    connection: Any, targets: Sequence[HostTarget], *, packages: Sequence[str] | None,
    dry_run: bool, notes: str = "",
) -> CreatedJob:
    """Upsert the hosts and insert the job and its host rows in ONE transaction."""
    if not targets:
        raise DispatchError("give at least one --host")
    # the connection commits, or rolls back on any error
    with connection, connection.cursor() as cursor:
        host_ids = []
        for target in targets:
            cursor.execute(
                "INSERT INTO hosts (fqdn, ip_address, display_name, agent_port)"
                " VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (fqdn, ip_address) DO UPDATE"
                " SET agent_port = EXCLUDED.agent_port, updated_at = now()"
                " RETURNING id::text",
                (target.fqdn, target.ip_address, target.fqdn, target.port))
            host_ids.append(cursor.fetchone()[0])
        if len(set(host_ids)) != len(host_ids):
            raise DispatchError("the same host was given twice")
        selection = json.dumps(list(packages) if packages is not None else [])
        cursor.execute(
            "INSERT INTO patch_jobs (kind, status, immediate, patch_selection, notes,"
            " allow_reboot, started_at)"
            " VALUES ('patch_apply', 'running', false, %s::jsonb, %s, false, now())"
            " RETURNING id::text",
            (selection, notes or ("lpa dispatch (dry run)" if dry_run else "lpa dispatch")))
        job_id = cursor.fetchone()[0]
        rows = []
        for host_id, target in zip(host_ids, targets, strict=True):
            cursor.execute(
                "INSERT INTO patch_job_hosts (job_id, host_id, status)"
                " VALUES (%s, %s, 'pending')"
                " RETURNING id::text", (job_id, host_id))
            rows.append(HostRow(cursor.fetchone()[0], host_id, target))
    return CreatedJob(job_id, tuple(rows))


async def start_on_agents(
    connection: Any, job: CreatedJob, client_for: Callable[[HostTarget], AgentClient], *,
    packages: Sequence[str] | None, dry_run: bool, security_only: bool = False,
) -> list[StartResult]:
    """Start the job on every agent at once; mark each row running with its agent job id, or
    failed (rows are written in host order as the answers are read)."""
    starts = [
        Deferred.fromCoroutine(client_for(row.target).apply(
            dry_run=dry_run, security_only=security_only, packages=packages))
        for row in job.hosts
    ]
    results = []
    for row, started in zip(job.hosts, starts, strict=True):
        try:
            data = await started
            agent_job_id = (data or {}).get("job_id")
            if not isinstance(agent_job_id, str) or not agent_job_id:
                raise ClientError("the agent's 202 answer carries no job_id")
        except ClientError as error:
            reason = f"could not start the job on {row.target.fqdn}:{row.target.port}: {error}"
            _fail_row(connection, job.job_id, row, reason)
            results.append(StartResult(row, error=reason))
            continue
        with connection, connection.cursor() as cursor:
            cursor.execute(
                "UPDATE patch_job_hosts SET status = 'running', agent_job_id = %s,"
                " started_at = now() WHERE id = %s AND status = 'pending'",
                (agent_job_id, row.row_id))
        results.append(StartResult(row, agent_job_id=agent_job_id))
    return results


def _fail_row(connection: Any, job_id: str, row: HostRow, reason: str) -> None:
    """Row → failed, host notify, and the parent roll-up under its row lock (one transaction)."""
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM patch_jobs WHERE id = %s FOR UPDATE", (job_id,))
        cursor.execute(
            "UPDATE patch_job_hosts SET status = 'failed', error_message = %s, last_error = %s,"
            " completed_at = now()"
            " WHERE id = %s AND status NOT IN ('succeeded','failed','cancelled')",
            (reason, reason, row.row_id))
        cursor.execute("SELECT pg_notify(%s, %s)", (notify.CHANNEL, notify.build_payload(
            event_type=notify.EVENT_HOST, job_id=job_id, host_id=row.host_id, status="failed",
            error_message=reason, transport="dispatch")))
        cursor.execute("SELECT status::text FROM patch_job_hosts WHERE job_id = %s", (job_id,))
        statuses = [status for (status,) in cursor.fetchall()]
        final = rollup_status(statuses)
        if final is None:
            return
        cursor.execute(
            "UPDATE patch_jobs SET status = %s::job_status, completed_at = now() WHERE id = %s"
            " AND status NOT IN ('succeeded','failed','cancelled')", (final, job_id))
        if cursor.rowcount:
            cursor.execute("SELECT pg_notify(%s, %s)", (notify.CHANNEL, notify.build_payload(
                event_type=notify.EVENT_JOB, job_id=job_id, status=final,
                succeeded_count=statuses.count("succeeded"),
                failed_count=statuses.count("failed"), host_count=len(statuses))))


# --- the command line ------------------------------------------------------------------------


def default_client_factory(
    reactor: Any, credentials: Credentials, timeout: float = 30.0,
) -> tuple[Callable[[HostTarget], AgentClient], Any]:
    """``client_for(target)`` over one mTLS treq client, and its pool (close it when done)."""
    http, pool = make_http_client(reactor, credentials, timeout)

    def client_for(target: HostTarget) -> AgentClient:
        return AgentClient(http, AgentUrl(target.fqdn, target.port), clock=reactor,
                           timeout=timeout)

    return client_for, pool


def connect(dsn: str) -> Any:
    import psycopg2

    try:
        return psycopg2.connect(dsn)
    except psycopg2.Error as error:
        raise DispatchError(f"cannot connect to the database: {str(error).strip()}") from None


async def dispatch(
    dsn: str, targets: Sequence[HostTarget], client_for: Callable[[HostTarget], AgentClient], *,
    reactor: Any, packages: Sequence[str] | None, dry_run: bool, security_only: bool = False,
    watch: bool = False, timeout: float = 300.0, out: TextIO | None = None,
    connect: Callable[[str], Any] = connect,
) -> tuple[CreatedJob, list[StartResult], dict[str, Any] | None]:
    """The whole ``lpa dispatch``: create, start, and (``watch``) follow to the job-level event."""
    import psycopg2
    import psycopg2.errors

    out = sys.stdout if out is None else out
    dry = " (DRY-RUN)" if dry_run else ""
    writer = connect(dsn)
    listener = connect(dsn) if watch else None
    try:
        if listener is not None:
            listen(listener)
        try:
            job = create_job(writer, targets, packages=packages, dry_run=dry_run)
            out.write(f"job {job.job_id}: {len(job.hosts)} host(s)"
                      + (", DRY-RUN: agents report what would change and change nothing"
                         if dry_run else "") + "\n")
            out.flush()
            results = await start_on_agents(writer, job, client_for, packages=packages,
                                            dry_run=dry_run, security_only=security_only)
        except psycopg2.errors.UndefinedTable as error:
            raise DispatchError(f"{str(error).strip().splitlines()[0]}: run "
                                "`lpa db migrate --dsn DSN` first") from None
        except psycopg2.Error as error:
            raise DispatchError(f"database error: {str(error).strip()}") from None
        for result in results:
            target = result.row.target
            if result.agent_job_id:
                out.write(f"{target.fqdn}:{target.port}: started agent job "
                          f"{result.agent_job_id}{dry}\n")
            else:
                out.write(f"{target.fqdn}:{target.port}: {result.error}\n")
        out.flush()
        final = None
        if listener is not None:
            names = {row.host_id: row.target.fqdn for row in job.hosts}
            final = await watch_job(listener, job.job_id, out, reactor=reactor, names=names,
                                    timeout=timeout)
        return job, results, final
    finally:
        writer.close()
        if listener is not None:
            listener.close()


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``lpa dispatch``."""
    parser = subparsers.add_parser(
        "dispatch", help="create a patch job in the manager's database and start it on agents",
        description="Do what a patch manager does: upsert the hosts, create a patch_jobs row and "
        "its patch_job_hosts rows in one transaction, start the job on each agent (POST "
        "/api/v1/patches/apply) and mark each row running with its agent_job_id, for lpa-relay "
        "to follow. --watch prints the job_update notifications until the job-level one.")
    parser.add_argument("--dsn", required=True,
                        help="PostgreSQL DSN or URL of the manager's database")
    parser.add_argument("--host", dest="hosts", action="append", required=True,
                        metavar="NAME[:PORT]",
                        help="an agent (repeatable); NAME must match its certificate; port 12443")
    parser.add_argument("--dry-run", action="store_true",
                        help="agents report what would change; change nothing")
    parser.add_argument("--security-only", action="store_true", help="security updates only")
    parser.add_argument("--packages", nargs="+", metavar="NAME",
                        help="only these packages (default all)")
    parser.add_argument("--watch", action="store_true",
                        help="follow job_update until the job-level notification")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds --watch waits (default 300)")
    parser.add_argument("--cert", help="client certificate PEM (default $LPA_CERT)")
    parser.add_argument("--key", help="client key PEM (default $LPA_KEY)")
    parser.add_argument("--ca", help="CA that signed the agents (default $LPA_CA)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    targets = [parse_host(text) for text in args.hosts]
    credentials = Credentials.resolve(args.cert, args.key, args.ca)
    credentials.check()
    return runner.run(lambda reactor: run_dispatch(args, targets, credentials, reactor=reactor))


async def run_dispatch(
    args: argparse.Namespace, targets: Sequence[HostTarget], credentials: Credentials, *,
    reactor: Any, out: TextIO | None = None,
) -> int:
    """``lpa dispatch`` on the reactor; exit 0 when every host started (and, with --watch,
    the job succeeded)."""
    client_for, pool = default_client_factory(reactor, credentials)
    try:
        _, results, final = await dispatch(
            args.dsn, targets, client_for, reactor=reactor, packages=args.packages,
            dry_run=args.dry_run, security_only=args.security_only, watch=args.watch,
            timeout=args.timeout, out=out)
    finally:
        await pool.closeCachedConnections()
    if final is not None:
        return 0 if final.get("status") == "succeeded" else 1
    return 0 if all(result.agent_job_id for result in results) else 1
