"""Tests for ``lpa dispatch`` against a real throwaway PostgreSQL and scripted agents (StubTreq);
``--watch`` reads the LISTEN connection through the reactor."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import select
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpa.tools import dispatch
from lpa.tools.client import AgentClient
from lpa.tools.dispatch import HostTarget, parse_host
from lpa.tools.jobupdates import DispatchError, listen, watch_job
from tests import pg
from tests.test_client import envelope, scripted

AGENT_JOB = "5f0e8a4e-1d0c-4c55-9d3a-0f7e8f1f2b3c"


def fresh_database(case: SynchronousTestCase) -> str:
    """A migrated database of its own for ``case`` (on the run's one cluster)."""
    return pg.database(case, migrated=True)


def connect(case: SynchronousTestCase, dsn: str) -> Any:
    import psycopg2

    connection = psycopg2.connect(dsn)
    case.addCleanup(connection.close)
    return connection


def query(connection: Any, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with connection, connection.cursor() as cursor:
        cursor.execute(sql, args)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        return rows


def notify(connection: Any, payload: dict[str, Any]) -> None:
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify('job_update', %s)", (json.dumps(payload),))


def ok_agent() -> AgentClient:
    return scripted({("POST", "/api/v1/patches/apply"): [
        (202, envelope({"job_id": AGENT_JOB, "status": "pending"}))]})[0]


def refusing_agent() -> AgentClient:
    return scripted({("POST", "/api/v1/patches/apply"): [
        (429, envelope(error={"code": "QUEUE_FULL", "message": "queue is full",
                              "retryable": True}))]})[0]


def done(case: SynchronousTestCase, coroutine: Any) -> Any:
    return case.successResultOf(Deferred.fromCoroutine(coroutine))


class ParseHostTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """NAME, NAME:PORT and [IPv6]:PORT parse; the name is resolved to an address."""
        resolve = {"web1": "10.0.0.5", "::1": "::1", "127.0.0.1": "127.0.0.1"}.__getitem__
        self.assertEqual(parse_host("web1", resolve), HostTarget("web1", "10.0.0.5", 12443))
        self.assertEqual(parse_host("web1:9443", resolve), HostTarget("web1", "10.0.0.5", 9443))
        self.assertEqual(parse_host("[::1]:7", resolve), HostTarget("::1", "::1", 7))

    def test_bad(self) -> None:
        """A bad port or an unresolvable name is a one-line DispatchError."""
        self.assertRaises(DispatchError, parse_host, "web1:http", lambda n: "10.0.0.1")
        self.assertRaises(DispatchError, parse_host, ":80", lambda n: "10.0.0.1")
        error = self.assertRaises(DispatchError, parse_host, "no-such-host.invalid")
        self.assertIn("no-such-host.invalid", str(error))

    def test_help(self) -> None:
        """lpa dispatch --help says what it does."""
        top = argparse.ArgumentParser(prog="lpa")
        dispatch.add_parser(top.add_subparsers())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertRaises(SystemExit, top.parse_args, ["dispatch", "--help"])
        self.assertIn("patch_job_hosts", out.getvalue())


class DatabaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dsn = fresh_database(self)
        self.db = connect(self, self.dsn)
        self.targets = [HostTarget("a.example", "10.0.0.1", 12443),
                        HostTarget("b.example", "10.0.0.2", 9443)]

    def test_create_job(self) -> None:
        """One job row (running) and one pending row per host; hosts upserted with their port."""
        job = dispatch.create_job(self.db, self.targets, packages=["curl"], dry_run=True)
        again = dispatch.create_job(self.db, [HostTarget("a.example", "10.0.0.1", 1)],
                                    packages=None, dry_run=False)
        self.assertEqual(again.hosts[0].host_id, job.hosts[0].host_id)
        self.assertEqual(query(self.db, "SELECT fqdn, agent_port FROM hosts ORDER BY fqdn"),
                         [("a.example", 1), ("b.example", 9443)])
        self.assertEqual(query(self.db, "SELECT status::text, kind::text, patch_selection,"
                                        " allow_reboot FROM patch_jobs WHERE id = %s", job.job_id),
                         [("running", "patch_apply", ["curl"], False)])
        self.assertEqual(query(self.db, "SELECT status::text, agent_job_id FROM patch_job_hosts"
                                        " WHERE job_id = %s", job.job_id),
                         [("pending", None), ("pending", None)])

    def test_duplicate_host_writes_nothing(self) -> None:
        """The same host twice is refused and the transaction leaves no row behind."""
        self.assertRaises(DispatchError, dispatch.create_job, self.db,
                          [self.targets[0], self.targets[0]], packages=None, dry_run=True)
        self.assertEqual(query(self.db, "SELECT count(*) FROM hosts"), [(0,)])
        self.assertEqual(query(self.db, "SELECT count(*) FROM patch_jobs"), [(0,)])

    def test_start(self) -> None:
        """A started host is running with its agent_job_id; a refusal fails only that row."""
        job = dispatch.create_job(self.db, self.targets, packages=None, dry_run=True)
        clients = {"a.example": ok_agent(), "b.example": refusing_agent()}
        results = done(self, dispatch.start_on_agents(self.db, job, lambda t: clients[t.fqdn],
                                                      packages=None, dry_run=True))
        self.assertEqual([r.agent_job_id for r in results], [AGENT_JOB, None])
        self.assertIn("QUEUE_FULL", results[1].error)
        rows = query(self.db, "SELECT h.fqdn, r.status::text, r.agent_job_id, r.error_message"
                              " FROM patch_job_hosts r JOIN hosts h ON h.id = r.host_id"
                              " WHERE r.job_id = %s ORDER BY h.fqdn", job.job_id)
        self.assertEqual(rows[0][:3], ("a.example", "running", AGENT_JOB))
        self.assertEqual(rows[1][1:3], ("failed", None))
        self.assertIn("QUEUE_FULL", rows[1][3])
        self.assertEqual(query(self.db, "SELECT status::text FROM patch_jobs"), [("running",)])

    def test_all_refused_rolls_up_once(self) -> None:
        """When every agent refuses, the parent fails and exactly one job-level notify fires."""
        listener = connect(self, self.dsn)
        listen(listener)
        job = dispatch.create_job(self.db, self.targets, packages=None, dry_run=True)
        done(self, dispatch.start_on_agents(self.db, job, lambda t: refusing_agent(),
                                            packages=None, dry_run=True))
        self.assertEqual(query(self.db, "SELECT status::text FROM patch_jobs"), [("failed",)])
        notify(self.db, {"event_type": "sentinel"})  # one session's notifies arrive in order
        payloads: list[dict[str, Any]] = []
        while not payloads or payloads[-1]["event_type"] != "sentinel":
            self.assertTrue(select.select([listener], [], [], 10)[0], payloads)
            listener.poll()
            payloads += [json.loads(n.payload) for n in listener.notifies]
            del listener.notifies[:]
        payloads.pop()
        self.assertEqual([p["event_type"] for p in payloads], ["host", "host", "job"])
        self.assertEqual((payloads[2]["failed_count"], payloads[2]["host_count"]), (2, 2))

    def test_dispatch_command(self) -> None:
        """dispatch(): create, start, print one line per host, saying DRY-RUN for a dry run."""
        out = io.StringIO()
        job, _results, final = done(self, dispatch.dispatch(
            self.dsn, self.targets[:1], lambda t: ok_agent(), reactor=None, packages=None,
            dry_run=True, out=out))
        self.assertIsNone(final)
        self.assertEqual(out.getvalue().splitlines(), [
            (f"job {job.job_id}: 1 host(s), DRY-RUN: agents report what would change and change "
            "nothing"), f"a.example:12443: started agent job {AGENT_JOB} (DRY-RUN)"])
        out = io.StringIO()
        done(self, dispatch.dispatch(self.dsn, self.targets[:1], lambda t: ok_agent(),
                                     reactor=None, packages=None, dry_run=False, out=out))
        self.assertNotIn("DRY-RUN", out.getvalue())

    def test_unmigrated_database(self) -> None:
        """A database without the schema names the migration to run."""
        dsn = pg.database(self)
        running = Deferred.fromCoroutine(dispatch.dispatch(
            dsn, self.targets[:1], lambda t: ok_agent(), reactor=None, packages=None,
            dry_run=True, out=io.StringIO()))
        self.assertIn("lpa db migrate", str(self.failureResultOf(running, DispatchError).value))

    def test_bad_dsn(self) -> None:
        """An unreachable database is one line, not a traceback."""
        error = self.assertRaises(DispatchError, dispatch.connect,
                                  "postgresql://nobody@/nodb?host=/nonexistent")
        self.assertIn("cannot connect", str(error))


class WatchTests(TestCase):
    """--watch: notifications read when the reactor sees the LISTEN socket readable."""

    timeout = 60

    def setUp(self) -> None:
        self.dsn = fresh_database(self)
        self.db = connect(self, self.dsn)
        self.targets = [HostTarget("a.example", "10.0.0.1", 12443)]
        self.clock = Clock()

    def listener(self) -> Any:
        listener = connect(self, self.dsn)
        listen(listener)
        return listener

    async def test_watch(self) -> None:
        """watch prints host changes (output at most every second), returns the job payload."""
        listener = self.listener()
        job_id = str(uuid.uuid4())
        out = io.StringIO()
        clock = [0.0]
        at_seq: dict[int | None, float] = {3: 0.0, 4: 0.5, 5: 1.5}  # when each payload arrives

        def arrived(payload: dict[str, Any]) -> None:
            clock[0] = at_seq.get(payload.get("seq"), clock[0])

        watching = Deferred.fromCoroutine(watch_job(
            listener, job_id, out, reactor=reactor, names={"h1": "web1"}, timeout=30,
            monotonic=lambda: clock[0], on_payload=arrived))
        notify(self.db, {"event_type": "host", "job_id": "other", "host_id": "h",
                         "status": "failed"})
        notify(self.db, {"event_type": "host", "job_id": job_id, "host_id": "h1",
                         "status": "running", "progress": 40, "seq": 3, "transport": "ws"})
        notify(self.db, {"event_type": "host", "job_id": job_id, "host_id": "h1",
                         "status": "running", "progress": 40, "seq": 4, "transport": "ws"})
        notify(self.db, {"event_type": "host", "job_id": job_id, "host_id": "h1",
                         "status": "running", "progress": 40, "seq": 5, "transport": "ws",
                         "output": "Inst a\nInst b\n"})
        notify(self.db, {"event_type": "job", "job_id": job_id, "status": "succeeded",
                         "succeeded_count": 1, "failed_count": 0, "host_count": 1})
        final = await watching
        self.assertEqual(final["status"], "succeeded")
        self.assertEqual(out.getvalue().splitlines(), [
            "web1: running 40% seq=3 via ws",
            "web1: running 40% seq=5 via ws | Inst b",
            f"job {job_id} succeeded: 1 succeeded, 0 failed of 1 hosts"])

    async def test_already_arrived(self) -> None:
        """Notifications that arrived before the watch began are read too."""
        listener = self.listener()
        job_id = str(uuid.uuid4())
        notify(self.db, {"event_type": "job", "job_id": job_id, "status": "failed",
                         "succeeded_count": 0, "failed_count": 1, "host_count": 1})
        listener.poll()  # psycopg2 has them queued; the socket is no longer readable
        final = await watch_job(listener, job_id, io.StringIO(), reactor=reactor)
        self.assertEqual(final["status"], "failed")

    def test_watch_recovers_lost_notification(self) -> None:
        """A terminal parent without a notification still ends the watch (read from the table)."""
        job = dispatch.create_job(self.db, self.targets, packages=None, dry_run=True)
        query(self.db, "UPDATE patch_job_hosts SET status = 'succeeded' RETURNING 1")
        query(self.db, "UPDATE patch_jobs SET status = 'succeeded' RETURNING 1")
        out = io.StringIO()
        watching = Deferred.fromCoroutine(watch_job(
            self.listener(), job.job_id, out, reactor=reactor, clock=self.clock, timeout=30))
        self.assertNoResult(watching)
        self.clock.advance(5)
        final = self.successResultOf(watching)
        self.assertEqual((final["status"], final["recovered"], final["succeeded_count"]),
                         ("succeeded", True, 1))
        self.assertIn("(read from the database)", out.getvalue())

    def test_watch_timeout(self) -> None:
        """No job-level notification within the timeout is a DispatchError naming the status."""
        job = dispatch.create_job(self.db, self.targets, packages=None, dry_run=True)
        watching = Deferred.fromCoroutine(watch_job(
            self.listener(), job.job_id, io.StringIO(), reactor=reactor, clock=self.clock,
            timeout=12, recheck_interval=5))
        self.clock.pump([5, 5, 2])
        error = self.failureResultOf(watching, DispatchError).value
        self.assertIn("after 12 s (status running", str(error))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_watch_idle_check(self) -> None:
        """on_idle runs while nothing arrives, and what it raises ends the watch."""
        job = dispatch.create_job(self.db, self.targets, packages=None, dry_run=True)
        calls: list[int] = []

        def on_idle() -> None:
            calls.append(1)
            if len(calls) == 2:
                raise DispatchError("lpa-relay exited")

        watching = Deferred.fromCoroutine(watch_job(
            self.listener(), job.job_id, io.StringIO(), reactor=reactor, clock=self.clock,
            timeout=60, recheck_interval=1, on_idle=on_idle))
        self.clock.pump([1, 1])
        error = self.failureResultOf(watching, DispatchError).value
        self.assertEqual((str(error), len(calls)), ("lpa-relay exited", 2))

    async def test_database_lost(self) -> None:
        """The LISTEN connection killed by the server ends the watch with one clear line."""
        listener = self.listener()
        job_id = str(uuid.uuid4())
        watching = Deferred.fromCoroutine(watch_job(
            listener, job_id, io.StringIO(), reactor=reactor, timeout=30))
        query(self.db, "SELECT pg_terminate_backend(%s)", listener.get_backend_pid())
        with self.assertRaises(DispatchError) as caught:
            await watching
        self.assertTrue(str(caught.exception).startswith(
            f"the database connection was lost while watching job {job_id}: "),
            str(caught.exception))


class RealAgentTests(TestCase):
    """lpa dispatch against a real agent over mutual TLS and a real database."""

    timeout = 60

    async def test_dispatch_dry_run(self) -> None:
        """The job starts on the agent over mTLS; the row runs with its agent job id."""
        import os
        import shutil
        import tempfile

        from lpa.tools.client import Credentials
        from tests.agentclient import start_agent
        from tests.certs import make_test_pki

        dsn = fresh_database(self)
        tmp = tempfile.mkdtemp(prefix="lpa-dispatch-")
        self.addCleanup(shutil.rmtree, tmp, True)
        pki = make_test_pki(os.path.join(tmp, "pki"))
        _, port = await start_agent(self, pki, tmp)
        args = argparse.Namespace(dsn=dsn, packages=None, dry_run=True, security_only=False,
                                  watch=False, timeout=30.0)
        out = io.StringIO()
        code = await dispatch.run_dispatch(
            args, [HostTarget("localhost", "127.0.0.1", port)],
            Credentials(pki.good.cert, pki.good.key, pki.ca_cert), reactor=reactor, out=out)
        self.assertEqual(code, 0, out.getvalue())
        db = connect(self, dsn)
        [(status, agent_job_id)] = query(db, "SELECT status::text, agent_job_id"
                                             " FROM patch_job_hosts")
        self.assertEqual(status, "running")
        self.assertEqual(out.getvalue().splitlines()[1],
                         f"localhost:{port}: started agent job {agent_job_id} (DRY-RUN)")
