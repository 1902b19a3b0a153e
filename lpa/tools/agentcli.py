"""``lpa agent URL ACTION``: an operator's command line for one lpa-agent (or linux-patch-api).

Each action is a coroutine run on the reactor by :func:`lpa.tools.runner.run` with a treq client
(:mod:`lpa.tools.client`) and, for ``watch``, the agent's WebSocket (:mod:`lpa.tools.stream`,
followed by :mod:`lpa.tools.watch`).  Read actions print a table or ``key: value`` lines with a
header, or with ``--json`` the envelope's ``data`` as the agent sent it; ``apply --watch`` and
``watch`` with ``--json`` print one JSON object per line.  Diagnostics go to stderr as
``lpa: …``; a failure is one ``lpa: error: …`` line (see :mod:`lpa.tools.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO

import attr
from twisted.internet.interfaces import IReactorTime

from lpa.events import CANCELLED, COMPLETED, TERMINAL_STATUSES
from lpa.tools import runner, stream
from lpa.tools.client import (
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    ENV_CA,
    ENV_CERT,
    ENV_KEY,
    AgentClient,
    AgentUrl,
    ClientError,
    Credentials,
    make_http_client,
)
from lpa.tools.tables import pairs, scalars, table, to_json, yes_no
from lpa.tools.watch import ProgressPrinter, final_lines, follow_job

OpenStream = Callable[[], Awaitable[stream.JobStream]]


@attr.s(auto_attribs=True)
class Session:
    """What one action needs: the agent's client, where to write, how to open its stream."""

    client: AgentClient
    clock: IReactorTime
    out: TextIO
    err: TextIO
    open_stream: OpenStream | None

    def say(self, *lines: str) -> None:
        for line in lines:  # line by line, as a reader that goes away (| head) expects
            self.out.write(line + "\n")
        self.out.flush()

    def note(self, line: str) -> None:
        self.err.write(f"lpa: {line}\n")
        self.err.flush()


async def execute(
    args: argparse.Namespace, *, reactor: Any, clock: IReactorTime | None = None,
    out: TextIO | None = None, err: TextIO | None = None,
    environ: Mapping[str, str] | None = None, http: Any = None,
    open_stream: OpenStream | None = None,
) -> int:
    """Run one ``lpa agent`` action; collaborators are injectable for tests."""
    clock = reactor if clock is None else clock
    url = AgentUrl.parse(args.url)
    credentials = Credentials.resolve(args.cert, args.key, args.ca, environ)
    pool = None
    if http is None:
        http, pool = make_http_client(reactor, credentials, args.timeout, secure=url.secure)
    if open_stream is None and not getattr(args, "poll", True):

        def open_stream() -> Awaitable[stream.JobStream]:
            tls_options = credentials.tls_options(url.host) if url.secure else None
            return stream.open_stream(url.ws_url(), reactor=reactor, clock=clock,
                                      tls_options=tls_options, timeout=args.timeout)

    session = Session(AgentClient(http, url, clock=clock, timeout=args.timeout), clock,
                      sys.stdout if out is None else out, sys.stderr if err is None else err,
                      None if getattr(args, "poll", True) else open_stream)
    try:
        return await _ACTIONS[args.action](session, args)
    finally:
        if pool is not None:
            await pool.closeCachedConnections()


# -- actions ------------------------------------------------------------------------------------


async def _health(s: Session, args: argparse.Namespace) -> int:
    data = await s.client.health()
    s.say(to_json(data) if args.json else "\n".join(pairs(scalars(data or {}, (
        "status", "version", "uptime_seconds", "agent_uptime_seconds", "cache_status",
        "last_cache_update", "crl_status")))))
    return 0


async def _info(s: Session, args: argparse.Namespace) -> int:
    data = await s.client.info()
    s.say(to_json(data) if args.json else "\n".join(pairs(scalars(data or {}, (
        "hostname", "os", "os_version", "kernel", "architecture", "pending_reboot")))))
    return 0


async def _packages(s: Session, args: argparse.Namespace) -> int:
    data = await s.client.packages(name=args.name, status=args.status,
                                   upgradable=True if args.upgradable else None)
    if args.json:
        s.say(to_json(data))
        return 0
    packages = (data or {}).get("packages", [])
    s.say(*table(("name", "version", "status", "latest"), (
        (p.get("name"), p.get("version"), p.get("status"), p.get("latest_version"))
        for p in packages)), f"{len(packages)} packages")
    return 0


async def _patches(s: Session, args: argparse.Namespace) -> int:
    data = await s.client.patches(security=args.security)
    if args.json:
        s.say(to_json(data))
        return 0
    data = data or {}
    patches = data.get("patches", [])
    s.say(*table(("package", "current", "available", "severity", "security", "reboot"), (
        (p.get("name"), p.get("current_version"), p.get("available_version"), p.get("severity"),
         yes_no(p.get("security")), yes_no(p.get("requires_reboot"))) for p in patches)),
        f"{len(patches)} patches ({data.get('security_updates', 0)} security); "
        f"reboot required: {yes_no(bool(data.get('requires_reboot')))}")
    return 0


async def _jobs(s: Session, args: argparse.Namespace) -> int:
    data = await s.client.jobs(status=args.status, limit=args.limit)
    if args.json:
        s.say(to_json(data))
        return 0
    jobs = (data or {}).get("jobs", [])
    s.say(*table(("job id", "status", "operation", "dry-run", "created", "error"), (
        (j.get("job_id"), j.get("status"), j.get("operation"), yes_no(j.get("dry_run")),
         j.get("created_at"), j.get("error_code")) for j in jobs)), f"{len(jobs)} jobs")
    return 0


async def _job(s: Session, args: argparse.Namespace) -> int:
    data = await s.client.job(args.job_id)
    if args.json:
        s.say(to_json(data))
        return 0
    s.say(*job_lines(data or {}))
    return 0


def job_lines(detail: Mapping[str, Any], tail: int = 10) -> list[str]:
    """A job detail for people: the fields, what it changes, why it failed, its last output."""
    lines = pairs([
        ("job", detail.get("job_id")), ("operation", detail.get("operation")),
        ("status", detail.get("status")), ("dry run", yes_no(detail.get("dry_run"))),
        ("progress", f"{detail.get('progress', 0)}%"), ("message", detail.get("message")),
        ("created", detail.get("created_at")), ("completed", detail.get("completed_at")),
        ("packages", ", ".join(map(str, detail.get("packages") or [])) or "all"),
        ("error", ": ".join(str(p) for p in (detail.get("error_code"), detail.get("error"))
                            if p) or None),
        ("exit code", detail.get("exit_code")), ("seq", detail.get("seq")),
    ])
    changes = detail.get("changes") or []
    if changes:
        lines += ["", f"changes ({len(changes)}):"]
        lines += ["  " + line for line in table(("package", "from", "to", "action"), (
            (c.get("name"), c.get("from"), c.get("to"), c.get("action")) for c in changes))]
    stderr = [line for line in str(detail.get("command_stderr") or "").splitlines()
              if line.strip()]
    if stderr:
        lines += ["", f"stderr (last {min(tail, len(stderr))} lines):"]
        lines += ["  " + line for line in stderr[-tail:]]
    logs = [str(line) for line in detail.get("logs") or []]
    if logs:
        lines += ["", f"output (last {min(tail, len(logs))} of {len(logs)} lines):"]
        lines += ["  " + line for line in logs[-tail:]]
    return lines


async def _events(s: Session, args: argparse.Namespace) -> int:
    data = await s.client.events(args.job_id, args.after)
    if args.json:
        s.say(to_json(data))
        return 0
    events = (data or {}).get("events", [])
    s.say(*table(("seq", "event", "kind", "status", "progress", "message"), (
        (e.get("seq"), e.get("event"), e.get("kind"), e.get("status"), e.get("progress"),
         e.get("message")) for e in events)),
        f"{len(events)} events; last seq {(data or {}).get('last_seq', '-')}; "
        f"status {(data or {}).get('status', '-')}")
    return 0


async def _apply(s: Session, args: argparse.Namespace) -> int:
    data = await s.client.apply(dry_run=args.dry_run, security_only=args.security_only,
                                packages=args.packages) or {}
    job_id = data.get("job_id")
    if args.json:
        s.say(json.dumps(data, sort_keys=True) if args.watch else to_json(data))
    else:
        s.say(f"job {job_id} {data.get('status', 'pending')}"
              + (" (DRY-RUN)" if args.dry_run else ""))
    if not args.watch or not isinstance(job_id, str):
        return 0
    status = await watch(s, job_id, json_lines=args.json, dry_run=args.dry_run,
                         interval=args.interval)
    return 0 if status == COMPLETED else 1


async def _cancel(s: Session, args: argparse.Namespace) -> int:
    data = await s.client.cancel(args.job_id) or {}
    status = str(data.get("status", ""))
    if args.json and not args.watch:
        s.say(to_json(data))
        return 0
    if status == CANCELLED:
        s.say(f"job {args.job_id} cancelled")
        return 0
    if status in TERMINAL_STATUSES:  # it ended before the cancel reached it
        s.say(f"job {args.job_id} had already ended {status}")
        return 1
    s.say(f"cancel of job {args.job_id} accepted; it was {status or 'running'} and is stopping"
          + ("" if args.watch else f" (follow it with: lpa agent {args.url} watch "
                                   f"{args.job_id})"))
    if not args.watch:
        return 0
    final = await watch(s, args.job_id, json_lines=args.json, interval=args.interval)
    return 0 if final == CANCELLED else 1


async def _watch(s: Session, args: argparse.Namespace) -> int:
    status = await watch(s, args.job_id, json_lines=args.json, interval=args.interval)
    return 0 if status == COMPLETED else 1


async def watch(
    s: Session, job_id: str, *, json_lines: bool = False, dry_run: bool | None = None,
    interval: float = 2.0,
) -> str:
    """Follow ``job_id`` to its end, show it, state the end once; returns the final status."""
    printer = ProgressPrinter(s.out, json_lines=json_lines)
    follower = await follow_job(
        job_id, client=s.client, clock=s.clock, open_stream=s.open_stream, show=printer.show,
        note=s.note, interval=interval)
    latest = follower.outcome or follower.latest
    status = latest.status if latest is not None else "unknown"
    detail = None
    if not json_lines and (status != COMPLETED or dry_run is None):
        try:  # the reason of a failure (stderr) and the dry-run flag live in the detail
            detail = await s.client.job(job_id)
        except ClientError as error:
            s.note(f"could not read the job's detail: {error}")
    printer.finish(final_lines(job_id, latest, detail, dry_run=dry_run))
    return status


_ACTIONS: dict[str, Callable[[Session, argparse.Namespace], Awaitable[int]]] = {
    "health": _health, "info": _info, "packages": _packages, "patches": _patches,
    "jobs": _jobs, "job": _job, "events": _events, "apply": _apply, "cancel": _cancel,
    "watch": _watch,
}


# -- the command line ---------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``lpa agent``."""
    parser = subparsers.add_parser(
        "agent", help="talk to one agent's REST API and follow its jobs",
        description="Talk to one lpa-agent (or linux-patch-api) over mutual TLS. Certificates "
        f"come from --cert/--key/--ca or ${ENV_CERT}, ${ENV_KEY}, ${ENV_CA}.")
    parser.add_argument("url", metavar="URL", help="the agent: HOST, HOST:PORT or "
                        f"https://HOST[:PORT] (port {DEFAULT_PORT})")
    parser.add_argument("--cert", help=f"client certificate PEM (default ${ENV_CERT})")
    parser.add_argument("--key", help=f"client private key PEM (default ${ENV_KEY})")
    parser.add_argument("--ca", help=f"CA bundle that signed the agent (default ${ENV_CA})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds for each request and the WebSocket handshake; watch gives "
                        "up when the agent stays unreachable that long (default 30)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def read(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=description)
        sub.add_argument("--json", action="store_true",
                         help="print the agent's data as JSON (stable, for scripts)")
        return sub

    read("health", "print the agent's health", "GET /api/v1/health.")
    read("info", "print the host's system information", "GET /api/v1/system/info.")
    packages = read("packages", "list packages", "GET /api/v1/packages: installed and "
                    "available packages.")
    packages.add_argument("--name", help="only packages whose name contains this")
    packages.add_argument("--status", choices=("installed", "upgradable", "available"),
                          help="only packages in this state")
    packages.add_argument("--upgradable", action="store_true", help="only upgradable packages")
    patches = read("patches", "list pending patches",
                   "List the patches the agent would apply, with a header and a summary line.")
    patches.add_argument("--security", action="store_true", help="security updates only")
    jobs = read("jobs", "list recent jobs", "List the agent's jobs, newest first.")
    jobs.add_argument("--status", help="only jobs in this status (pending, running, completed …)")
    jobs.add_argument("--limit", type=int, help="at most this many (agent default 50)")
    job = read("job", "show one job", "One job: fields, changes, error and its last output.")
    job.add_argument("job_id", metavar="ID", help="the agent's job id")
    events = read("events", "list a job's numbered events",
                  "GET /api/v1/jobs/{id}/events?after=N: the kept events after N.")
    events.add_argument("job_id", metavar="ID", help="the agent's job id")
    events.add_argument("--after", type=int, default=0, metavar="N",
                        help="only events after seq N (default 0: all kept)")

    apply = read("apply", "start a patch job",
                 "POST /api/v1/patches/apply: start a patch job (all pending patches unless "
                 "--packages) and print its id; --watch follows it to its end.")
    apply.add_argument("--dry-run", action="store_true",
                       help="report what would change; change nothing")
    apply.add_argument("--security-only", action="store_true", help="security updates only")
    apply.add_argument("--packages", nargs="+", metavar="NAME", help="only these packages")
    apply.add_argument("--watch", action="store_true", help="follow the job until it ends")
    _add_watch_options(apply)
    cancel = read("cancel", "cancel a pending or running job",
                  "POST /api/v1/jobs/{id}/cancel. A running job is stopped by the agent; "
                  "--watch follows it to its final state (exit 0 when it ended cancelled).")
    cancel.add_argument("job_id", metavar="ID", help="the agent's job id")
    cancel.add_argument("--watch", action="store_true", help="follow the job until it ends")
    _add_watch_options(cancel)
    watch_parser = read(
        "watch", "follow a job to its end",
        "Follow a job over the WebSocket (a progress bar on a terminal, one line per event "
        "otherwise, one JSON object per event with --json); poll the events endpoint when the "
        "WebSocket handshake fails. Ends with one line stating the final state (and why a job "
        "failed). Exits 0 when the job completed, 1 otherwise.")
    watch_parser.add_argument("job_id", metavar="ID", help="the agent's job id")
    _add_watch_options(watch_parser)
    parser.set_defaults(func=_main)


def _add_watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll", action="store_true",
                        help="poll over REST; do not try the WebSocket")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between polls (default 2)")


def _main(args: argparse.Namespace) -> int:
    return runner.run(lambda reactor: execute(args, reactor=reactor))
