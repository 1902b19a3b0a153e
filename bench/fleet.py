"""Fleet benchmark: simulated agents, a real lpa-relay, PostgreSQL with fsync on, pgbench beside.

Run by hand (not part of the trial suite)::

    .venv/bin/python bench/fleet.py                      # every scenario, about 14 minutes
    .venv/bin/python bench/fleet.py --scenario ceiling --seconds 10
    .venv/bin/python bench/fleet.py --scenario long --minutes 1

Processes (all on this machine, loopback and unix sockets only, removed at exit):

* this script: the PostgreSQL cluster (``lpa.tools.pgcluster`` with ``fsync``,
  ``synchronous_commit`` and ``full_page_writes`` ON), and on its reactor the simulated agents:
  one per port, each the agent's real WebSocket job stream (``lpa.agent.ws.JobStreamFactory``
  over ``tests.fakes_jobs.FakeJobManager``'s ``EventLog``) behind mutual TLS 1.3 (``tests/certs.py``
  PKI), accepting the ``lpa.jobs.v1`` subprotocol when offered, plus the events endpoint
  (``GET /api/v1/jobs/{id}/events?after=N``) for the relay's backstop sweep;
* the relay: ``twistd -n lpa-relay`` in a child process, importing ``lpa`` from this checkout;
* a LISTEN session on ``job_update`` in a child process (psycopg2), recording when each
  notification arrived;
* the named peer, pgbench (4 clients, ``-T``) running the naive one-event transaction on the same
  cluster before the scenarios: ``BEGIN; UPDATE patch_job_hosts … WHERE id = … AND status NOT IN
  (terminal); SELECT pg_notify('job_update', <400 bytes>); END``.  Its transactions per second
  are the ceiling a relay that commits once per event could reach here.

Freshness: from the moment a simulated agent appends an event (``time.monotonic()``; one clock
for every process on Linux) to the moment the LISTEN session receives a notification of that row
with a ``seq`` at least as high.  Applied events/s counts events whose notification arrived
within the offered window.

Scenarios (each one job, every agent one host row of it, ~60-byte output lines, a progress event
every tenth, the job's hosts all end):

``ceiling``  200 agents offering pgbench's measured ceiling in total;
``fanout``   1,000 agents offering 500 events/s in all (on average over the window); each host
             ends at a random time in the window's last fifth, so ~170 hosts end per second
             then (terminal-event freshness reported apart);
``long``     100 agents × 5 events/s for ``--minutes`` (10: 3,000 lines per host); first and last
             minute compared, relay memory sampled every minute.
The largest payload of every scenario is reported (the payload target).
"""

from __future__ import annotations

import argparse
import atexit
import heapq
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import psycopg2  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402

from lpa.tools.pgcluster import PostgresCluster  # noqa: E402

LINE = "Setting up libexample{n:04d}:amd64 (1.2.{n}-1+deb12u1) ... ok"  # 60 bytes or so
PAYLOAD_400 = json.dumps({"event_type": "host", "output": "x" * 300, "pad": "y" * 40})


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- PostgreSQL as a real server runs it ------------------------------------------------------


class DurableCluster(PostgresCluster):
    """The test cluster, but with fsync, synchronous_commit and full_page_writes on."""

    statements = False  # load pg_stat_statements (--statements)

    def start(self) -> None:
        if self.running:
            return
        if not os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
            self._prepare()
        options = (
            f"-k {self.socket_dir} -p {self.port} -c listen_addresses='' -c fsync=on "
            "-c synchronous_commit=on -c full_page_writes=on -c max_connections=200"
            + (" -c shared_preload_libraries=pg_stat_statements" if self.statements else "")
        )
        self._run("pg_ctl", "-D", self.data_dir, "-l", self.log_path, "-o", options, "-w", "start")
        self.running = True


# -- the LISTEN session (child process) -------------------------------------------------------


def listener_main(dsn: str, out_path: str) -> None:
    """LISTEN job_update until stdin closes; then write every receipt to ``out_path``."""
    import select

    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("LISTEN job_update")
    print("listening", flush=True)
    received = []
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([connection, stdin], [], [], 1.0)
        if connection in ready:
            connection.poll()
            now = time.monotonic()
            while connection.notifies:
                note = connection.notifies.pop(0)
                received.append((now, len(note.payload.encode("utf-8")), note.payload))
        if stdin in ready and not os.read(stdin, 4096):
            break
    rows = []
    for at, size, payload in received:
        try:
            data = json.loads(payload)
        except ValueError:
            continue
        rows.append([at, size, data.get("event_type"), data.get("job_id"),
                     data.get("agent_job_id"), data.get("seq"), data.get("status")])
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle)


class Listener:
    def __init__(self, dsn: str, directory: str) -> None:
        self.path = os.path.join(directory, f"listen-{time.monotonic_ns()}.json")
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--listener", dsn, self.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.process.stdout.readline()  # "listening"

    def finish(self) -> list[list[Any]]:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=120)
        with open(self.path, encoding="utf-8") as handle:
            return json.load(handle)


# -- the simulated agents (this process, on the reactor) --------------------------------------


class Agent:
    """One agent: the real job stream over mutual TLS on its own port, one job."""

    def __init__(self, reactor: Any, tls: Any, keep: int) -> None:
        from autobahn.twisted.resource import WebSocketResource
        from twisted.web.server import Site

        from lpa.agent.model import JobRequest
        from lpa.agent.ws import JobStreamFactory, JobStreamProtocol
        from lpa.events import RUNNING
        from lpa.protocol import SUBPROTOCOL
        from tests.fakes_jobs import FakeJobManager

        class Protocol(JobStreamProtocol):
            def onConnect(self, request: Any) -> Any:
                super().onConnect(request)
                return SUBPROTOCOL if SUBPROTOCOL in request.protocols else None

        self.jobs = FakeJobManager(reactor, max_events_per_job=keep)
        factory = JobStreamFactory(self.jobs.events, self.jobs, clock=reactor,
                                   max_connections=8, send_buffer_events=keep + 100)
        factory.protocol = Protocol
        root, api, v1, ws = Resource(), Resource(), Resource(), Resource()
        root.putChild(b"api", api)
        api.putChild(b"v1", v1)
        v1.putChild(b"ws", ws)
        ws.putChild(b"jobs", WebSocketResource(factory))
        v1.putChild(b"jobs", _JobsResource(self.jobs))
        self.port = reactor.listenSSL(0, Site(root), tls, interface="127.0.0.1", backlog=128)
        self.job_id = self.jobs.submit(JobRequest(operation="patch_apply", dry_run=True)).id
        self.jobs.emit(self.job_id, "Job started", status=RUNNING)
        self.emitted: list[tuple[int, float]] = []  # (seq, monotonic) of measured events
        self.lines = 0
        self.terminal: tuple[int, float] | None = None

    def line(self, measured: bool = True) -> None:
        from lpa.events import KIND_OUTPUT, KIND_PROGRESS

        self.lines += 1
        if self.lines % 10 == 0:
            job = self.jobs.jobs[self.job_id]
            job.progress = min(99, job.progress + 1)
            self.jobs.emit(self.job_id, "Unpacking", kind=KIND_PROGRESS)
        else:
            self.jobs.emit(self.job_id, LINE.format(n=self.lines), kind=KIND_OUTPUT)
        if measured:
            self.emitted.append((self.jobs.events.last_seq(self.job_id), time.monotonic()))

    def end(self, failed: bool) -> None:
        from lpa.events import COMPLETED, FAILED

        self.jobs.finish(self.job_id, FAILED if failed else COMPLETED, "done")
        seq = self.jobs.events.last_seq(self.job_id) - 1  # the job_status event, not job_complete
        self.terminal = (seq, time.monotonic())
        self.emitted.append(self.terminal)

    @property
    def output_lines(self) -> int:
        return self.lines - self.lines // 10


#: when the relay polled a simulated agent (its backstop sweep while streaming)
POLLS: list[float] = []


class _JobsResource(Resource):
    """``GET /api/v1/jobs/{id}/events?after=N`` in the agent's envelope (the backstop sweep)."""

    isLeaf = True

    def __init__(self, jobs: Any) -> None:
        super().__init__()
        self.jobs = jobs

    def render(self, request: Any) -> bytes:
        POLLS.append(time.monotonic())
        request.setHeader(b"Content-Type", b"application/json")
        parts = [p for p in request.path.decode().split("/") if p]
        job_id = parts[3] if len(parts) > 3 else ""
        if job_id not in self.jobs.jobs:
            request.setResponseCode(404)
            return json.dumps({"success": False, "data": None, "error": {
                "code": "JOB_NOT_FOUND", "message": "Job not found"}}).encode()
        after = int((request.args.get(b"after") or [b"0"])[0])
        if parts[-1] == "events":
            events = [e.to_wire() for e in self.jobs.events.after(job_id, after)]
            return json.dumps({"success": True, "data": {"job_id": job_id, "events": events},
                               "error": None}).encode()
        request.setResponseCode(405)
        return b"{}"


# -- the relay (child process) ----------------------------------------------------------------


class Relay:
    def __init__(self, dsn: str, pki: Any, directory: str, profile: str | None = None) -> None:
        config = os.path.join(directory, "relay.toml")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(
                f'[database]\nurl = "{dsn}"\n'
                "[worker]\nws_relay_poll_interval_secs = 10\n"
                "ws_relay_max_pending_events = 100000\n"
                f'[security]\nagent_client_cert_path = "{pki.good.cert}"\n'
                f'agent_client_key_path = "{pki.good.key}"\nca_cert_path = "{pki.ca_cert}"\n')
        self.log_path = os.path.join(directory, f"relay-{time.monotonic_ns()}.log")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115  # stop() closes it
        profiling = ["--profile", profile, "--profiler", "cprofile", "--savestats"] if profile \
            else []
        self.process = subprocess.Popen(
            [twistd, "-n", "--pidfile=", *profiling, "lpa-relay", "--config", config],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=directory)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> list[str]:
        """SIGTERM, wait; the log lines at warn level and above."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return [line.rstrip() for line in handle
                    if re.search(r"#(warn|error|critical)\]|Unhandled|Traceback|in \d+ transa",
                                 line)]


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) \
        / os.sysconf("SC_CLK_TCK")


def postgres_cpu(cluster: PostgresCluster) -> float:
    """CPU seconds of the postmaster and every process it started (backends, writers …).

    Exited backends' time is in the postmaster's "children" fields, which process_cpu counts.
    """
    with open(os.path.join(cluster.data_dir, "postmaster.pid")) as pidfile:
        postmaster = int(pidfile.readline())
    total = process_cpu(postmaster)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == postmaster:
                total += process_cpu(int(entry))
    return total


# -- the database side ------------------------------------------------------------------------


class Database:
    def __init__(self, dsn: str) -> None:
        self.connection = psycopg2.connect(dsn)
        self.connection.autocommit = True

    def one(self, sql: str, params: tuple = ()) -> Any:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()

    def job(self, agents: list[Agent]) -> str:
        job_id = self.one(
            "INSERT INTO patch_jobs (status) VALUES ('running') RETURNING id::text")[0]
        with self.connection.cursor() as cursor:
            for n, agent in enumerate(agents):
                cursor.execute(
                    "INSERT INTO hosts (fqdn, ip_address, agent_port) VALUES ('localhost', %s, %s) "
                    "ON CONFLICT (fqdn, ip_address) DO UPDATE SET agent_port = EXCLUDED.agent_port "
                    "RETURNING id", (f"10.{n // 65536}.{n // 256 % 256}.{n % 256}",
                                     agent.port.getHost().port))
                host = cursor.fetchone()[0]
                cursor.execute(
                    "INSERT INTO patch_job_hosts (job_id, host_id, status, agent_job_id) "
                    "VALUES (%s, %s, 'running', %s)", (job_id, host, agent.job_id))
        return job_id

    def following(self, job_id: str) -> int:
        """Rows of the job the relay has applied at least the first event of."""
        return self.one("SELECT count(*) FROM patch_job_hosts WHERE job_id = %s "
                        "AND relay_last_seq > 0", (job_id,))[0]

    def top_statements(self, count: int = 8) -> list[str]:
        """The statements that took the most server time (pg_stat_statements), one line each."""
        with self.connection.cursor() as cursor:
            cursor.execute(
                "SELECT calls, total_exec_time, mean_exec_time, rows, "
                "regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "ORDER BY total_exec_time DESC LIMIT %s", (count,))
            return [f"{calls:>7} calls {total / 1000:7.2f} s {mean:7.3f} ms/call {rows:>8} rows "
                    f"{query[:90]}" for calls, total, mean, rows, query in cursor.fetchall()]

    def reset_statements(self) -> None:
        self.one("SELECT pg_stat_statements_reset()::text")

    def commits(self) -> int:
        return self.one("SELECT xact_commit FROM pg_stat_database "
                        "WHERE datname = current_database()")[0]

    def finished(self, job_id: str, agents: list[Agent]) -> dict[str, Any]:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT status::text, relay_host_count FROM patch_jobs WHERE id = %s",
                           (job_id,))
            status, counted = cursor.fetchone()
            cursor.execute(
                "SELECT agent_job_id, status::text, "
                "CASE WHEN output = '' THEN 0 ELSE array_length(string_to_array(output, E'\\n'), 1)"
                " END FROM patch_job_hosts WHERE job_id = %s", (job_id,))
            rows = {agent_job: (row_status, lines) for agent_job, row_status, lines in cursor}
        wrong = [a.job_id for a in agents if rows.get(a.job_id, ("", -1))[1] != a.output_lines]
        return {"job": status, "counted": counted, "rows_ended": sum(
            1 for s, _ in rows.values() if s in ("succeeded", "failed")),
            "rows_with_wrong_output": len(wrong)}


def run_pgbench(cluster: PostgresCluster, dsn: str, database: str, seconds: float,
                directory: str) -> dict[str, float]:
    """The peer: pgbench's one-event transaction with 4 clients; tps and latency."""
    db = Database(dsn)
    with db.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS fleet_pgbench_rows (n INT PRIMARY KEY, "
                       "row_id UUID NOT NULL)")
        job = db.one("INSERT INTO patch_jobs (status) VALUES ('running') RETURNING id")[0]
        for n in range(1, 201):
            cursor.execute("INSERT INTO hosts (fqdn, ip_address) VALUES (%s, '192.0.2.1') "
                           "RETURNING id", (f"pgbench{n}.invalid",))
            host = cursor.fetchone()[0]
            cursor.execute("INSERT INTO patch_job_hosts (job_id, host_id, status) VALUES "
                           "(%s, %s, 'running') RETURNING id", (job, host))
            cursor.execute("INSERT INTO fleet_pgbench_rows VALUES (%s, %s)",
                           (n, cursor.fetchone()[0]))
    db.connection.close()
    script = os.path.join(directory, "one_event.sql")
    with open(script, "w", encoding="utf-8") as handle:
        handle.write(
            "\\set n random(1, 200)\n"
            "BEGIN;\n"
            "UPDATE patch_job_hosts SET relay_last_seq = relay_last_seq + 1, "
            "relay_last_event_at = now(), relay_progress = :n % 100 "
            "WHERE id = (SELECT row_id FROM fleet_pgbench_rows WHERE n = :n) "
            "AND status NOT IN ('succeeded', 'failed', 'cancelled');\n"
            f"SELECT pg_notify('job_update', '{PAYLOAD_400}');\n"
            "END;\n")
    logs = os.path.join(directory, "pgbench")
    os.makedirs(logs, exist_ok=True)
    completed = subprocess.run(
        [os.path.join(cluster.bin_dir, "pgbench"), "-n", "-c", "4", "-j", "2", "-T",
         str(int(seconds)), "-f", script, "-l", "--log-prefix", os.path.join(logs, "log"),
         "-h", cluster.socket_dir, "-p", str(cluster.port), "-U", "postgres", database],
        capture_output=True, text=True, check=True)
    tps = float(re.search(r"tps = ([0-9.]+)", completed.stdout).group(1))
    latencies = []
    for name in os.listdir(logs):
        with open(os.path.join(logs, name)) as handle:
            latencies.extend(int(line.split()[2]) / 1e6 for line in handle)
    return {"tps": tps, "p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99)}


# -- one scenario -----------------------------------------------------------------------------


async def run_scenario(reactor: Any, name: str, options: argparse.Namespace, env: dict[str, Any],
                       agents_count: int, rate: float, seconds: float,
                       end_spread: tuple[float, float] | None) -> dict[str, Any]:
    """``end_spread``: each host ends at a random time in that fraction of the window (else at
    the window's end)."""
    keep = 600
    agents = [Agent(reactor, env["tls"], keep) for _ in range(agents_count)]
    database = Database(env["dsn"])
    job_id = database.job(agents)
    relay = Relay(env["dsn"], env["pki"], env["directory"], options.profile_relay)
    listener = Listener(env["dsn"], env["directory"])
    try:
        deadline = time.monotonic() + 60 + agents_count / 10
        while database.following(job_id) < agents_count:
            if relay.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name}: the relay did not pick up every row "
                                 f"({database.following(job_id)}/{agents_count}); see "
                                 f"{relay.log_path}")
            await task.deferLater(reactor, 0.5, lambda: None)
        await task.deferLater(reactor, 1.0, lambda: None)
        # hosts that end early leave the others to carry the offered rate on average
        active = 1.0 if end_spread is None else sum(end_spread) / 2
        per_agent = rate / agents_count / active
        random.seed(agents_count)
        start = time.monotonic() + 0.1
        ends = []
        for _ in agents:
            if end_spread is None:
                ends.append(start + seconds)
            else:
                ends.append(start + seconds * random.uniform(*end_spread))
        due = [(start + random.uniform(0, 1 / per_agent), n) for n in range(agents_count)]
        heapq.heapify(due)
        if options.statements:
            database.reset_statements()
        cpu0, rss0, commits0 = relay.cpu_seconds(), relay.rss_mib(), database.commits()
        others0 = time.process_time(), postgres_cpu(env["cluster"])
        rss_samples = [(0.0, rss0)]
        next_sample = start + 60
        failing = set(random.sample(range(agents_count), agents_count // 10))
        ended = 0
        while due:
            now = time.monotonic()
            while due and due[0][0] <= now:
                at, n = heapq.heappop(due)
                agent = agents[n]
                if at >= ends[n]:
                    agent.end(failed=n in failing)
                    ended += 1
                    continue
                agent.line()
                heapq.heappush(due, (at + 1 / per_agent, n))
            if now >= next_sample:
                rss_samples.append((now - start, relay.rss_mib()))
                next_sample += 60
            wait = (due[0][0] - time.monotonic()) if due else 0
            await task.deferLater(reactor, max(0.0, min(wait, 0.005)), lambda: None)
        window_end = max(emitted for a in agents for _, emitted in a.emitted[-1:])
        # drain: until every terminal event is notified (or 60 s)
        await deferToThread(time.sleep, 3.0)
        deadline = time.monotonic() + 60
        while database.one("SELECT status::text FROM patch_jobs WHERE id = %s", (job_id,))[0] \
                == "running" and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.5, lambda: None)
        await task.deferLater(reactor, 1.0, lambda: None)
        cpu = relay.cpu_seconds() - cpu0
        others = (time.process_time() - others0[0], postgres_cpu(env["cluster"]) - others0[1])
        rss_samples.append((time.monotonic() - start, relay.rss_mib()))
        commits = database.commits() - commits0
        notes = await deferToThread(listener.finish)
        warnings = await deferToThread(relay.stop)
        checked = database.finished(job_id, agents)
        statements = database.top_statements() if options.statements else []
        database.connection.close()
    finally:
        if relay.process.poll() is None:
            relay.process.kill()
        if listener.process.poll() is None:
            listener.process.kill()
        for agent in agents:
            await agent.port.stopListening()
    result = analyse(name, agents, notes, start, window_end, cpu, rss_samples, commits, checked,
                     warnings, rate, job_id)
    result["statements"] = statements
    polls = sorted(at - start for at in POLLS if start <= at <= window_end)
    result["polls"] = polls
    del POLLS[:]
    result["bench_cpu"], result["postgres_cpu"] = others
    return result


def analyse(name: str, agents: list[Agent], notes: list[list[Any]], start: float,
            window_end: float, cpu: float, rss: list[tuple[float, float]], commits: int,
            checked: dict[str, Any], warnings: list[str], rate: float,
            job_id: str) -> dict[str, Any]:
    by_agent: dict[str, list[tuple[float, int]]] = {}
    job_notes = 0
    largest = 0
    counted = 0
    for at, size, kind, note_job, agent_job, seq, _status in notes:
        if note_job != job_id:
            continue
        counted += 1
        largest = max(largest, size)
        if kind == "job":
            job_notes += 1
        elif seq is not None:
            by_agent.setdefault(agent_job, []).append((at, seq))
    fresh: list[tuple[float, float, bool]] = []  # (emitted, freshness, terminal)
    missing = 0
    for agent in agents:
        received = by_agent.get(agent.job_id, [])
        i = 0
        for seq, emitted in agent.emitted:
            while i < len(received) and received[i][1] < seq:
                i += 1
            if i == len(received):
                missing += 1
                continue
            fresh.append((emitted, received[i][0] - emitted,
                          agent.terminal is not None and seq == agent.terminal[0]))
    window = window_end - start
    offered = sum(len(a.emitted) for a in agents)
    applied = sum(1 for emitted, delay, _ in fresh if emitted + delay <= window_end)
    all_delays = [d for _, d, _ in fresh]
    terminal = [d for _, d, t in fresh if t]
    tenths = [[d for e, d, _ in fresh if int(10 * (e - start) / max(window_end - start, 1e-9))
               == n] for n in range(10)]
    first = [d for e, d, _ in fresh if e - start < 60]
    last = [d for e, d, _ in fresh if window_end - e <= 60]
    return {
        "name": name, "agents": len(agents), "rate": rate, "window": window,
        "offered": offered / window, "applied": applied / window, "missing": missing,
        "p50": pct(all_delays, 0.5) * 1000, "p99": pct(all_delays, 0.99) * 1000,
        "terminal_p50": pct(terminal, 0.5) * 1000, "terminal_p99": pct(terminal, 0.99) * 1000,
        "first_p50": pct(first, 0.5) * 1000, "first_p99": pct(first, 0.99) * 1000,
        "last_p50": pct(last, 0.5) * 1000, "last_p99": pct(last, 0.99) * 1000,
        "notifies": counted, "job_notifies": job_notes, "largest": largest,
        "cpu": cpu, "cpu_share": cpu / max(window, 1e-9), "rss": rss, "commits": commits,
        "checked": checked, "warnings": warnings,
        "lines_per_host": max(a.output_lines for a in agents),
        "tenths": [pct(t, 0.99) * 1000 for t in tenths],
    }


def report(result: dict[str, Any], peer: dict[str, float]) -> None:
    r = result
    print(f"\n== {r['name']}: {r['agents']} agents, offered {r['rate']:.0f} events/s "
          f"for {r['window']:.0f} s")
    print(f"  offered {r['offered']:.0f} ev/s, applied {r['applied']:.0f} ev/s "
          f"({r['applied'] / r['offered']:.3f}x offered, {r['applied'] / peer['tps']:.2f}x the "
          f"pgbench ceiling); {r['missing']} events never notified")
    print(f"  freshness p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms; terminal events p50 "
          f"{r['terminal_p50']:.1f} ms, p99 {r['terminal_p99']:.1f} ms")
    print("  p99 ms by tenth of the window: " + " ".join(f"{t:.0f}" for t in r["tenths"]))
    if r["polls"]:
        seconds = sorted({int(at) for at in r["polls"]})
        print(f"  the relay's backstop sweep polled agents {len(r['polls'])} times, in second(s) "
              + ", ".join(str(s) for s in seconds[:12]) + (" …" if len(seconds) > 12 else ""))
    if r["window"] > 120:
        print(f"  first minute p50 {r['first_p50']:.1f} / p99 {r['first_p99']:.1f} ms; last "
              f"minute p50 {r['last_p50']:.1f} / p99 {r['last_p99']:.1f} ms "
              f"(last/first p99 {r['last_p99'] / r['first_p99']:.2f}x)")
    print(f"  notifications {r['notifies']} ({r['job_notifies']} job-level), largest payload "
          f"{r['largest']} B; relay commits {r['commits']} "
          f"({r['offered'] * r['window'] / max(r['commits'], 1):.1f} events per commit)")
    rss = ", ".join(f"{at / 60:.0f} min {mib:.0f}" for at, mib in r["rss"])
    print(f"  relay CPU {r['cpu']:.1f} s ({100 * r['cpu_share']:.0f}% of a core; "
          f"{r['cpu'] / max(r['offered'] * r['window'], 1) * 1e6:.0f} us per event); RSS MiB: "
          f"{rss}")
    print(f"  meanwhile: agents (this process) CPU {r['bench_cpu']:.1f} s, PostgreSQL CPU "
          f"{r['postgres_cpu']:.1f} s, of {(os.cpu_count() or 1) * r['window']:.0f} "
          "CPU-seconds in the window")
    c = r["checked"]
    print(f"  job {c['job']} (counted {c['counted']} hosts), {c['rows_ended']} rows ended, "
          f"{c['rows_with_wrong_output']} rows with a wrong line count; up to "
          f"{r['lines_per_host']} lines per host")
    for line in r.get("statements", []):
        print(f"    {line}")
    if r["warnings"]:
        print(f"  relay log, warnings and worse ({len(r['warnings'])}):")
        for line in r["warnings"][:10]:
            print(f"    {line[:200]}")


async def main(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    import twisted
    from lpa.relay.schema import migrate
    from tests.certs import make_test_pki

    def errors(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            failure = event.get("log_failure")
            print("  [bench log]", formatEvent(event),
                  failure.getTraceback() if failure is not None else "", file=sys.stderr)

    globalLogBeginner.beginLoggingTo([errors], redirectStandardIO=False)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    directory = tempfile.mkdtemp(prefix="lpa-fleet-")
    atexit.register(shutil.rmtree, directory, True)
    cluster = DurableCluster()
    cluster.statements = options.statements
    atexit.register(cluster.destroy)  # also after Ctrl-C, which stops the reactor under us
    print(f"fleet: Python {sys.version.split()[0]}, Twisted {twisted.__version__}, "
          f"psycopg2 {psycopg2.__version__.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; fsync on; relay = twistd -n lpa-relay (child process)")
    try:
        await deferToThread(cluster.start)
        dsn = await deferToThread(cluster.create_database, "fleet")
        await deferToThread(migrate, dsn)
        if options.statements:
            Database(dsn).one("CREATE EXTENSION pg_stat_statements; SELECT 1")
        pki = make_test_pki(os.path.join(directory, "pki"))
        env = {"dsn": dsn, "pki": pki, "directory": directory, "tls": pki.server_options(),
               "cluster": cluster}
        listener = Listener(dsn, directory)
        peer = await deferToThread(run_pgbench, cluster, dsn, "fleet", options.peer_seconds,
                                   directory)
        await deferToThread(listener.finish)
        print(f"peer: pgbench one-event transaction, 4 clients, {options.peer_seconds:.0f} s: "
              f"{peer['tps']:.0f} tps, latency p50 {peer['p50'] * 1000:.2f} ms, "
              f"p99 {peer['p99'] * 1000:.2f} ms")
        wanted = options.scenario
        if wanted in ("all", "ceiling"):
            report(await run_scenario(reactor, "ceiling", options, env, options.ceiling_agents,
                                      options.rate or peer["tps"], options.seconds, None), peer)
        if wanted in ("all", "fanout"):
            report(await run_scenario(reactor, "fanout", options, env, options.fanout_agents,
                                      500.0, max(options.seconds, 30.0), (0.8, 1.0)), peer)
        if wanted in ("all", "long"):
            report(await run_scenario(reactor, "long", options, env, 100, 500.0,
                                      options.minutes * 60, None), peer)
    finally:
        await deferToThread(cluster.destroy)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=("all", "ceiling", "fanout", "long"),
                        default="all")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="offered window of the ceiling and fanout scenarios (default 30)")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the long scenario (default 10)")
    parser.add_argument("--peer-seconds", type=float, default=15.0,
                        help="pgbench run (default 15)")
    parser.add_argument("--rate", type=float, default=None,
                        help="offered events/s of the ceiling scenario (default: pgbench's tps)")
    parser.add_argument("--ceiling-agents", type=int, default=200)
    parser.add_argument("--fanout-agents", type=int, default=1000)
    parser.add_argument("--statements", action="store_true",
                        help="load pg_stat_statements and print the costliest statements")
    parser.add_argument("--profile-relay", metavar="FILE",
                        help="run the relay under cProfile, statistics to FILE (pstats)")
    parser.add_argument("--listener", nargs=2, metavar=("DSN", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parsed = parse(sys.argv[1:])
    if parsed.listener:
        listener_main(*parsed.listener)
    else:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parsed)))
