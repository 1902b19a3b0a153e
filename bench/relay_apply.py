"""Relay write path: ``PostgresRelayStore.apply_events`` against the original pm-worker pattern.

Run by hand (not part of the trial suite)::

    .venv/bin/python bench/relay_apply.py [--quick] [--rows 8] [--events 3200]

Everything happens on a throwaway PostgreSQL cluster (``lpa.tools.pgcluster``: unix socket
only, fsync off, run as the ``postgres`` user when root) that is destroyed at exit.  The relay
schema comes from ``lpa.relay.schema.migrate``.  A separate psycopg2 session LISTENs on
``job_update`` during every run and counts what arrives.

The two contenders write the same events to the same kind of rows (one job, ``--rows`` running
``patch_job_hosts`` rows, each followed by its own sequential writer, all sharing a pool of
``--pool`` connections):

``lpa``
    ``PostgresRelayStore(pool_size=pool).apply_events(host_job, batch, "ws")``: calls that wait
    for a connection are applied together, one transaction for every row waiting (row locks,
    one write statement, one ``pg_notify`` statement with a payload of at most 1 KB per changed
    row, the roll-up on running counts under the parent lock).
``original``  (the named peer, "original pm-worker pattern": the manager's relay's statements)
    per event, separate autocommit statements with psycopg2: the guarded ``UPDATE``, then
    ``SELECT pg_notify('job_update', payload)`` with the event's ``output``/``error``
    untruncated; a terminal event then runs the check-then-act parent roll-up and its notify.
    A payload of 8000 bytes or more makes ``pg_notify`` fail: counted as a finding.

Scenarios:

1. **one event per call**, every row's writer as fast as it can (closed loop): the raw cost of
   applying one event.  Two event mixes: ``short`` (status, progress and ~90-byte output lines)
   and ``long`` (the same, plus a 9000-byte output line every 25 events and 12 KB errors on the
   failing rows).
2. **offered load** (short mix, twice the events): events arrive at a fixed total rate (by
   default 1.5x the original's closed-loop rate measured in scenario 1); lpa
   applies whatever queued up for a row while its previous call was in flight (as ``AgentLink``
   does), the original applies them one at a time (as ``relay_one_job`` awaits
   ``process_event`` per frame).  Latency is arrival to commit.

Latency figures of scenario 1 are per call (waiting for a pooled connection included).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import queue
import select
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg2
from twisted.internet import defer, task
from twisted.internet.threads import deferToThread

from lpa import events as ev
from lpa.events import JobEvent
from lpa.relay.interfaces import TRANSPORT_WS, AgentAddress, HostJob
from lpa.relay.notify import PG_NOTIFY_LIMIT
from lpa.relay.schema import migrate
from lpa.relay.store import PostgresRelayStore
from lpa.tools.pgcluster import PostgresCluster

TERMINAL_SQL = "('succeeded', 'failed', 'cancelled')"
LONG_LINE_EVERY = 25
LONG_LINE_BYTES = 9000
LONG_ERROR_BYTES = 12000
TIMESTAMP = "2026-11-25T20:00:00+00:00"
#: scenario 2 offers this multiple of the original's measured one-by-one capacity
RATE_OVER_PEER = 1.5


# -- the workload ----------------------------------------------------------------------------


def make_events(agent_job_id: str, count: int, mix: str, fail: bool) -> list[JobEvent]:
    """One agent job's events: running, output lines and progress, then one terminal event."""

    def one(seq: int, status: str, message: str, **kw: Any) -> JobEvent:
        return JobEvent(
            job_id=agent_job_id, seq=seq, status=status, message=message,
            timestamp=TIMESTAMP, **{"progress": 0, **kw},
        )

    made = [one(1, ev.RUNNING, "Job started")]
    for seq in range(2, count):
        progress = seq * 100 // count
        if seq % 10 == 0:
            made.append(one(seq, ev.RUNNING, f"Unpacking package {seq}", kind=ev.KIND_PROGRESS,
                            progress=progress))
        elif mix == "long" and seq % LONG_LINE_EVERY == 0:
            line = f"Get:{seq} http://deb.debian.org/debian bookworm/main amd64 "
            made.append(one(seq, ev.RUNNING, (line * (LONG_LINE_BYTES // len(line) + 1))
                            [:LONG_LINE_BYTES], kind=ev.KIND_OUTPUT, progress=progress))
        else:
            made.append(one(seq, ev.RUNNING,
                            f"Setting up libexample{seq}:amd64 (1.2.{seq}-1+deb12u1) ... "
                            "Processing triggers for man-db (2.11.2-2)",
                            kind=ev.KIND_OUTPUT, progress=progress))
    if fail:
        error = "E: Sub-process /usr/bin/dpkg returned an error code (1)"
        if mix == "long":
            error = (error + "\n" + "dpkg: error processing package libexample (--configure):"
                     " installed post-installation script subprocess returned error exit status"
                     " 1\n" * (LONG_ERROR_BYTES // 120))[:LONG_ERROR_BYTES]
        made.append(one(count, ev.FAILED, "Job failed", error=error, progress=100))
    else:
        made.append(one(count, ev.COMPLETED, "Job completed", progress=100))
    return made


class Fixture:
    """Blocking seeding over psycopg2: one job with ``rows`` running host rows per run."""

    def __init__(self, dsn: str, rows: int) -> None:
        self.connection = psycopg2.connect(dsn)
        self.connection.autocommit = True
        self.hosts = [self._one(
            "INSERT INTO hosts (fqdn, ip_address) VALUES (%s, %s) RETURNING id::text",
            (f"host{i}.bench.invalid", f"192.0.2.{i + 1}"),
        ) for i in range(rows)]

    def _one(self, sql: str, params: tuple) -> Any:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()[0]

    def new_job(self) -> list[HostJob]:
        job_id = self._one(
            "INSERT INTO patch_jobs (status) VALUES ('running') RETURNING id::text", ()
        )
        made = []
        for host_id in self.hosts:
            agent_job_id = str(uuid.uuid4())
            row_id = self._one(
                "INSERT INTO patch_job_hosts (job_id, host_id, status, agent_job_id) "
                "VALUES (%s, %s, 'running', %s) RETURNING id::text",
                (job_id, host_id, agent_job_id),
            )
            made.append(HostJob(row_id=row_id, job_id=job_id, host_id=host_id,
                                agent_job_id=agent_job_id, agent=AgentAddress("unused", 12443)))
        return made

    def statuses(self, job_id: str) -> tuple[str, list[str]]:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT status::text FROM patch_jobs WHERE id = %s", (job_id,))
            parent = cursor.fetchone()[0]
            cursor.execute("SELECT status::text FROM patch_job_hosts WHERE job_id = %s", (job_id,))
            return parent, sorted(row[0] for row in cursor.fetchall())

    def close(self) -> None:
        self.connection.close()


class Listener(threading.Thread):
    """A LISTEN job_update session in its own thread: counts notifications and payload sizes."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.connection = psycopg2.connect(dsn)
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            cursor.execute("LISTEN job_update")
        self.count = 0
        self.max_bytes = 0
        self._quit = threading.Event()

    def run(self) -> None:
        while not self._quit.is_set():
            if select.select([self.connection], [], [], 0.05)[0]:
                self.connection.poll()
                while self.connection.notifies:
                    note = self.connection.notifies.pop(0)
                    self.count += 1
                    self.max_bytes = max(self.max_bytes, len(note.payload.encode("utf-8")))

    def finish(self, expected_quiet: float = 0.3) -> None:
        """Stop after the session has been quiet for ``expected_quiet`` seconds."""
        last, seen = time.monotonic(), self.count
        while time.monotonic() - last < expected_quiet:
            time.sleep(0.05)
            if self.count != seen:
                last, seen = time.monotonic(), self.count
        self._quit.set()
        self.join()
        self.connection.close()


# -- the named peer: the original pm-worker pattern ----------------------------------------------

_DB_STATUS = {ev.PENDING: "running", ev.RUNNING: "running", ev.REBOOTING: "running",
              ev.COMPLETED: "succeeded", ev.FAILED: "failed", ev.TIMED_OUT: "failed",
              ev.CANCELLED: "cancelled"}


class OriginalRelay:
    """``process_event`` of ws_relay.rs, statement by statement, on a shared psycopg2 pool."""

    def __init__(self, dsn: str, pool: int) -> None:
        self._pool: queue.Queue[Any] = queue.Queue()
        for _ in range(pool):
            connection = psycopg2.connect(dsn)
            connection.autocommit = True
            self._pool.put(connection)
        self.pool_size = pool
        self.notify_failures = 0
        self.notify_sent = 0
        self.max_payload = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        for _ in range(self.pool_size):
            self._pool.get().close()

    def _notify(self, cursor: Any, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        size = len(text.encode("utf-8"))
        try:
            cursor.execute("SELECT pg_notify('job_update', %s)", (text,))
        except psycopg2.Error:  # "payload string too long": the original only logs it
            with self._lock:
                self.notify_failures += 1
                self.max_payload = max(self.max_payload, size)
            return
        with self._lock:
            self.notify_sent += 1
            self.max_payload = max(self.max_payload, size)

    def process_event(self, host_job: HostJob, event: JobEvent) -> None:
        status = _DB_STATUS[event.status]
        output = event.message if event.kind == ev.KIND_OUTPUT else ""
        terminal = status in ("succeeded", "failed", "cancelled")
        connection = self._pool.get()
        try:
            with connection.cursor() as cursor:
                if terminal:
                    cursor.execute(
                        "UPDATE patch_job_hosts SET status = %s::job_status, "
                        "output = CASE WHEN %s != '' THEN %s ELSE output END, "
                        f"error_message = %s, completed_at = NOW() WHERE job_id = %s AND "
                        f"host_id = %s AND status NOT IN {TERMINAL_SQL}",
                        (status, output, output, event.error, host_job.job_id, host_job.host_id),
                    )
                else:
                    cursor.execute(
                        "UPDATE patch_job_hosts SET status = %s::job_status, "
                        "output = CASE WHEN %s != '' THEN %s ELSE output END "
                        f"WHERE job_id = %s AND host_id = %s AND status NOT IN {TERMINAL_SQL}",
                        (status, output, output, host_job.job_id, host_job.host_id),
                    )
                if cursor.rowcount == 0:
                    return
                self._notify(cursor, {
                    "event_type": "host", "job_id": host_job.job_id, "host_id": host_job.host_id,
                    "status": status, "output": output or None, "error_message": event.error,
                    "agent_job_id": host_job.agent_job_id, "succeeded_count": None,
                    "failed_count": None, "host_count": None,
                })
                if terminal:
                    self._roll_up(cursor, host_job.job_id)
        finally:
            self._pool.put(connection)

    def _roll_up(self, cursor: Any, job_id: str) -> None:
        cursor.execute(
            "SELECT count(*) FROM patch_job_hosts "
            f"WHERE job_id = %s AND status NOT IN {TERMINAL_SQL}",
            (job_id,),
        )
        if cursor.fetchone()[0]:
            return
        cursor.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded'), "
            "count(*) FILTER (WHERE status = 'failed') FROM patch_job_hosts WHERE job_id = %s",
            (job_id,),
        )
        total, succeeded, failed = cursor.fetchone()
        status = "failed" if failed else "succeeded"
        cursor.execute(
            "UPDATE patch_jobs SET status = %s::job_status, completed_at = NOW() WHERE id = %s",
            (status, job_id),
        )
        self._notify(cursor, {
            "event_type": "job", "job_id": job_id, "host_id": "", "status": status,
            "output": None, "error_message": None, "agent_job_id": "",
            "succeeded_count": succeeded, "failed_count": failed, "host_count": total,
        })


# -- the runs ---------------------------------------------------------------------------------


class Result:
    def __init__(self, name: str, events: int, seconds: float,
                 latencies: list[tuple[float, float]],
                 notified: int, listened: int, max_listened: int, failures: int,
                 max_attempted: int, final: tuple[str, list[str]]) -> None:
        self.name = name
        self.events = events
        self.seconds = seconds
        # (position of the event in its row's stream, 0..1; latency in s)
        self.latencies = sorted(latency for _, latency in latencies)
        self.early = sorted(latency for where, latency in latencies if where < 0.1)
        self.late = sorted(latency for where, latency in latencies if where >= 0.9)
        self.notified = notified
        self.listened = listened
        self.max_listened = max_listened
        self.failures = failures
        self.max_attempted = max_attempted
        self.final = final

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def pct(self, q: float, which: list[float] | None = None) -> float:
        values = self.latencies if which is None else which
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))] * 1000


def _arrivals(rows: int, per_row: int, rate: float | None) -> list[list[float]]:
    """Arrival offsets (s) of each row's events; rows interleave at ``rate`` events/s in total."""
    if rate is None:
        return [[0.0] * per_row for _ in range(rows)]
    return [[(i * rows + r) / rate for i in range(per_row)] for r in range(rows)]


async def run_lpa(dsn: str, fixture: Fixture, mix: str, per_row: int, pool: int,
                  rate: float | None, reactor: Any) -> Result:
    host_jobs = await deferToThread(fixture.new_job)
    workloads = [make_events(h.agent_job_id, per_row, mix, fail=i % 2 == 1)
                 for i, h in enumerate(host_jobs)]
    listener = Listener(dsn)
    listener.start()
    store = PostgresRelayStore(dsn, clock=reactor, reactor=reactor, pool_size=pool,
                               max_pending_events=10 * per_row * len(host_jobs))
    await store.start()
    latencies: list[tuple[float, float]] = []
    notified = 0
    arrivals = _arrivals(len(host_jobs), per_row, rate)

    async def follow(host_job: HostJob, events: list[JobEvent], due: list[float]) -> None:
        nonlocal notified
        done = 0
        while done < len(events):
            now = time.perf_counter() - start
            if rate is None:
                batch_end = done + 1  # one event per call
            else:
                if due[done] > now:
                    await task.deferLater(reactor, due[done] - now, lambda: None)
                    now = time.perf_counter() - start
                batch_end = done + 1
                while batch_end < len(events) and due[batch_end] <= now:
                    batch_end += 1
            called = time.perf_counter()
            result = await store.apply_events(host_job, events[done:batch_end], TRANSPORT_WS)
            finished = time.perf_counter()
            notified += result.notified
            if rate is None:
                latencies.append((done / len(events), finished - called))
            else:
                latencies.extend((i / len(events), finished - start - due[i])
                                 for i in range(done, batch_end))
            done = batch_end

    start = time.perf_counter()
    await defer.gatherResults([
        defer.Deferred.fromCoroutine(follow(h, w, a))
        for h, w, a in zip(host_jobs, workloads, arrivals, strict=True)
    ], consumeErrors=True)
    seconds = time.perf_counter() - start
    await store.stop()
    await deferToThread(listener.finish)
    final = await deferToThread(fixture.statuses, host_jobs[0].job_id)
    return Result("lpa", per_row * len(host_jobs), seconds, latencies, notified, listener.count,
                  listener.max_bytes, 0, listener.max_bytes, final)


def run_original(dsn: str, fixture: Fixture, mix: str, per_row: int, pool: int,
                 rate: float | None) -> Result:
    host_jobs = fixture.new_job()
    workloads = [make_events(h.agent_job_id, per_row, mix, fail=i % 2 == 1)
                 for i, h in enumerate(host_jobs)]
    listener = Listener(dsn)
    listener.start()
    relay = OriginalRelay(dsn, pool)
    arrivals = _arrivals(len(host_jobs), per_row, rate)
    latencies: list[list[tuple[float, float]]] = [[] for _ in host_jobs]
    errors: list[BaseException] = []

    def follow(index: int) -> None:
        try:
            host_job, events, due = host_jobs[index], workloads[index], arrivals[index]
            for i, event in enumerate(events):
                if rate is not None:
                    wait = due[i] - (time.perf_counter() - start)
                    if wait > 0:
                        time.sleep(wait)
                called = time.perf_counter()
                relay.process_event(host_job, event)
                finished = time.perf_counter()
                latencies[index].append((
                    i / len(events),
                    finished - called if rate is None else finished - start - due[i],
                ))
        except BaseException as error:  # report, do not hang the run
            errors.append(error)

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(len(host_jobs))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    relay.close()
    listener.finish()
    if errors:
        raise errors[0]
    return Result("original", per_row * len(host_jobs), seconds,
                  [x for row in latencies for x in row], relay.notify_sent, listener.count,
                  listener.max_bytes, relay.notify_failures, relay.max_payload,
                  fixture.statuses(host_jobs[0].job_id))


# -- reporting --------------------------------------------------------------------------------


def report(title: str, lpa: Result, original: Result, rate: float | None) -> None:
    print(f"\n== {title}")
    print(f"{'':10}{'events':>8}{'secs':>8}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'notifies':>10}{'heard':>7}{'failed':>8}{'max payload B':>15}  job / rows")
    for r in (lpa, original):
        rows = ",".join(f"{s}x{r.final[1].count(s)}" for s in sorted(set(r.final[1])))
        print(f"{r.name:10}{r.events:>8}{r.seconds:>8.2f}{r.rate:>10.0f}{r.pct(0.5):>9.2f}"
              f"{r.pct(0.99):>9.2f}{r.notified:>10}{r.listened:>7}{r.failures:>8}"
              f"{r.max_attempted:>15}  {r.final[0]} / {rows}")
    for r in (lpa, original):
        print(f"{r.name}: p50 over each row's first 10% of events {r.pct(0.5, r.early):.2f} ms, "
              f"last 10% {r.pct(0.5, r.late):.2f} ms")
    ratio = lpa.rate / original.rate
    print(f"ratio lpa/original: events/s {ratio:.2f}x, p50 latency "
          f"{lpa.pct(0.5) / original.pct(0.5):.2f}x, p99 {lpa.pct(0.99) / original.pct(0.99):.2f}x")
    for r in (lpa, original):
        ok = r.max_attempted < PG_NOTIFY_LIMIT and r.failures == 0
        print(f"{r.name}: every payload < {PG_NOTIFY_LIMIT} bytes: {'yes' if ok else 'NO'}"
              + ("" if ok else f" ({r.failures} pg_notify calls failed: payload string too long;"
                               " those rows changed but no listener heard of it)"))
    if rate is not None:
        print(f"(offered {rate:.0f} events/s in total; latency = arrival to commit)")


async def main(reactor: Any, options: argparse.Namespace) -> None:
    import autobahn  # noqa: F401  (only to show the stack versions below)

    import twisted

    print(f"relay_apply: {options.rows} rows of one job, {options.per_row} events per row, "
          f"pool {options.pool} connections each; Python {sys.version.split()[0]}, "
          f"Twisted {twisted.__version__}, psycopg2 {psycopg2.__version__.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    cluster = PostgresCluster()
    atexit.register(cluster.destroy)  # also after Ctrl-C, which stops the reactor under us
    try:
        await deferToThread(cluster.start)
        dsn = await deferToThread(cluster.create_database, "relay_bench")
        await deferToThread(migrate, dsn)
        fixture = await deferToThread(Fixture, dsn, options.rows)
        print(f"PostgreSQL cluster in {cluster.directory} (unix socket, fsync off)")
        peer_capacity = 0.0
        for mix in ("short", "long"):
            lpa = await run_lpa(dsn, fixture, mix, options.per_row, options.pool, None, reactor)
            original = await deferToThread(run_original, dsn, fixture, mix, options.per_row,
                                           options.pool, None)
            report(f"one event per call, {mix} mix (closed loop, latency per call)",
                   lpa, original, None)
            if mix == "short":
                peer_capacity = original.rate
        # by default, offer more than the peer just showed it can apply one by one
        rate = options.rate or RATE_OVER_PEER * peer_capacity
        per_row = 2 * options.per_row  # twice the events: a steadier figure at a high rate
        lpa = await run_lpa(dsn, fixture, "short", per_row, options.pool, rate, reactor)
        original = await deferToThread(run_original, dsn, fixture, "short", per_row,
                                       options.pool, rate)
        report("offered load, short mix (lpa batches what queued up, as AgentLink does)",
               lpa, original, rate)
        if not options.rate:
            print(f"(the offered rate is {RATE_OVER_PEER:g}x the original's closed-loop short-mix "
                  "events/s measured above)")
        await deferToThread(fixture.close)
    finally:
        cluster.destroy()  # blocking, and safe when the coroutine is closed at interpreter exit


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 15 s)")
    parser.add_argument("--rows", type=int, default=8, help="host rows of the job")
    parser.add_argument("--events", type=int, default=None,
                        help="events per run in total (default 3200, quick 800)")
    parser.add_argument("--pool", type=int, default=4, help="connections per contender")
    parser.add_argument("--rate", type=float, default=None,
                        help="offered events/s in scenario 2 (default: 1.5x the original's "
                        "short-mix events/s measured in scenario 1)")
    options = parser.parse_args(argv)
    total = options.events or (800 if options.quick else 3200)
    options.per_row = max(3, total // options.rows)
    return options


if __name__ == "__main__":
    parsed = parse(sys.argv[1:])
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parsed)))
