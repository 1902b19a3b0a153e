"""Faults end to end: real agents, a real relay, a throwaway PostgreSQL, stand-in package runs.

Each test dispatches one patch job to several agent processes (``tests.agentproc``: the
package manager is a stand-in that prints a line every 0.1 s), lets a relay process follow it,
and hits the job mid-run with one fault, at least three times (one per host, or one after the
other).  What must hold afterwards, checked by :meth:`FaultTestCase.check` from the rows and
from a LISTEN session:

1. every host row ends in the agent's own final status (``GET /api/v1/jobs/{id}``), never
   ``running``; the parent job is rolled up from them;
2. each host's terminal status is notified exactly once, as its last notification;
3. exactly one job-level notification, with the parent's status and host count;
4. the ``seq`` in one host's notifications never goes backwards;
5. a row whose seq is above the agent's last one (the agent lost or renumbered events) was
   ended by the relay with a "lost or renumbered" warning in its log;
6. no "Unhandled Error" or traceback in any daemon's log (``tests.logcheck``), the relay's
   under a PostgreSQL restart included (its own test: txpostgres would report each lost
   connection as an Unhandled Error if the store did not catch it).

Moments are random: the seed is printed and ``LPA_FAULT_SEED=N`` repeats a run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from lpa.events import normalise_status
from lpa.relay.rows import DB_STATUS, DB_TERMINAL, rollup_status
from tests import pg
from tests.agentproc import AgentProcess, RelayProcess, kill_runs, relay_toml, wait_until
from tests.certs import make_test_pki
from tests.logcheck import assert_no_unhandled
from tests.pgutil import Seeder
from tests.system.faultkit import AsyncListener, BlackholeProxy, mutating_start

SEED = int(os.environ.get("LPA_FAULT_SEED") or random.SystemRandom().randrange(1 << 31))
print(f"tests.system.test_faults: random seed {SEED} (LPA_FAULT_SEED={SEED} repeats this run)")

#: the stand-in prints one line every INTERVAL seconds
INTERVAL = 0.1
#: journal records a "disk that lost its last writes" loses (2 s of output lines)
LOST_RECORDS = 20


@attr.s(auto_attribs=True)
class Host:
    """One host of the patch job: its agent, the proxy in front of it (if any), its row."""

    agent: AgentProcess
    agent_job: str
    row_id: str
    host_id: str
    proxy: BlackholeProxy | None = None


async def sleep(seconds: float) -> None:
    await deferLater(reactor, max(0.0, seconds), lambda: None)


async def sleep_until(when: float) -> None:
    """Sleep until ``time.time()`` reaches ``when`` (stand-in records use the wall clock)."""
    await sleep(when - time.time())


def drop_journal_tail(state_dir: str, records: int) -> int:
    """Cut the last ``records`` lines off the agent's newest journal segment (a disk that lost
    its last writes, cut at a record boundary); return how many were cut."""
    journal = os.path.join(state_dir, "journal")
    segments = sorted(n for n in os.listdir(journal) if n.startswith("wal-") and n.endswith(".log"))
    if not segments:
        return 0
    path = os.path.join(journal, segments[-1])
    with open(path, "rb") as stream:
        lines = stream.read().splitlines(keepends=True)
    keep = max(1, len(lines) - records)  # keep the segment's first record (the job's creation)
    with open(path, "wb") as stream:
        stream.write(b"".join(lines[:keep]))
    return len(lines) - keep


def daemon_logs(daemon: Any) -> tuple[str, str]:
    """A daemon's twistd log file and the file its stdout and stderr go to."""
    return daemon.log_path, os.path.join(daemon.directory, "stdout.log")


def run_all(*coroutines: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    """Run coroutines concurrently; fire when all did (the first failure fails it)."""
    deferreds: list[Deferred[Any]] = [Deferred.fromCoroutine(c) for c in coroutines]
    return gatherResults(deferreds, consumeErrors=True)


class FaultTestCase(TestCase):
    """Processes, database and checks shared by the fault tests; no tests here."""

    timeout = 300

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-faults-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))
        self.dsn = pg.database(self, migrated=True)
        self.seeder = Seeder(self.dsn)
        self.addCleanup(self._close_seeder)
        self.listener = AsyncListener(self.dsn)
        self.addCleanup(self.listener.close)
        self.random = random.Random(f"{SEED}:{self.id()}")
        self.agents: list[AgentProcess] = []
        self.relay: RelayProcess | None = None

    def _close_seeder(self) -> None:
        """Close the seeder in use at the end (a PostgreSQL restart replaces the first one)."""
        self.seeder.close()

    def note(self) -> str:
        return f"(seed {SEED}; LPA_FAULT_SEED={SEED} repeats it)"

    # -- processes ---------------------------------------------------------------------------

    async def start_agents(self, count: int, **scenario: Any) -> list[AgentProcess]:
        scenario.setdefault("interval", INTERVAL)
        agents = [
            AgentProcess(os.path.join(self.tmp, f"agent{n}"), self.pki, **scenario)
            for n in range(count)
        ]
        for agent in agents:
            self.addCleanup(agent.cleanup)
        await run_all(*(agent.start(timeout=60) for agent in agents))
        self.agents.extend(agents)
        return agents

    async def start_relay(self, dsn: str | None = None, **worker: Any) -> RelayProcess:
        relay = RelayProcess(
            os.path.join(self.tmp, "relay"), relay_toml(dsn or self.dsn, self.pki, **worker)
        )
        self.addCleanup(relay.cleanup)
        await relay.start(timeout=60)
        self.relay = relay
        return relay

    async def dispatch(
        self, agents: Sequence[AgentProcess], proxies: Sequence[BlackholeProxy] = ()
    ) -> tuple[str, list[Host]]:
        """What the manager does: one patch job, a row per agent once its 202 came back."""
        job_id = self.seeder.job("running")
        hosts = []
        for n, agent in enumerate(agents):
            code, body = await agent.request("POST", "/api/v1/patches/apply", json={})
            self.assertEqual(code, 202, body)
            proxy = proxies[n] if proxies else None
            port = proxy.port.getHost().port if proxy is not None else agent.port
            host_id = self.seeder.host("localhost", f"192.0.2.{n + 1}", port)
            row = self.seeder.host_job(job_id, host_id, body["data"]["job_id"])
            hosts.append(Host(agent, body["data"]["job_id"], row.row_id, host_id, proxy))
        return job_id, hosts

    async def package_run_started(self, host: Host) -> float:
        """Wait until the host's stand-in package run started; its start time (wall clock)."""
        await wait_until(
            lambda: mutating_start(host.agent) is not None, "the package run to start", 60
        )
        started = mutating_start(host.agent)
        assert started is not None
        return started

    # -- the end -----------------------------------------------------------------------------

    def job_ended(self, job_id: str, hosts: Sequence[Host]) -> bool:
        rows = [self.seeder.row(host.row_id)["status"] for host in hosts]
        return all(s in DB_TERMINAL for s in rows) and self.seeder.job_status(job_id) in DB_TERMINAL

    async def settle(self, job_id: str, hosts: Sequence[Host], timeout: float = 90) -> None:
        await wait_until(lambda: self.job_ended(job_id, hosts), f"every row to end {self.note()}",
                         timeout, step=0.25)

    async def all_notifications(self) -> list[dict[str, Any]]:
        """Stop the relay cleanly, then read every notification it ever sent.

        A marker notified after the relay exited comes after all of them (NOTIFYs reach a
        listener in commit order), so no sleep is needed to be sure nothing more is coming.
        """
        assert self.relay is not None
        await self.relay.stop()
        marker = str(uuid.uuid4())
        self.seeder.execute(
            "SELECT pg_notify('job_update', %s)", (json.dumps({"event_type": "marker",
                                                               "id": marker}),)
        )
        await wait_until(
            lambda: any(p.get("id") == marker for p in self.listener.received),
            "the marker notification",
            15,
        )
        return [p for p in self.listener.received if p.get("event_type") != "marker"]

    async def check(self, job_id: str, hosts: Sequence[Host]) -> dict[str, dict[str, Any]]:
        """Invariants 1–6 of the module docstring; return each host's agent job detail."""
        details: dict[str, dict[str, Any]] = {}
        for host in hosts:
            code, body = await host.agent.request("GET", f"/api/v1/jobs/{host.agent_job}")
            details[host.host_id] = body["data"] if code == 200 else {"status": None, "code": code}
        payloads = [p for p in await self.all_notifications() if p["job_id"] == job_id]
        relay_log = self.relay.log_text() if self.relay is not None else ""
        statuses = []
        for host in hosts:
            row = self.seeder.row(host.row_id)
            detail = details[host.host_id]
            statuses.append(row["status"])
            where = f"host {host.host_id} (agent job {host.agent_job}) {self.note()}"
            if detail["status"] is not None:
                expected = DB_STATUS[normalise_status(detail["status"])]
                self.assertEqual(row["status"], expected, f"{where}: row {row}, agent {detail}")
            self.assertIn(row["status"], DB_TERMINAL, where)
            self.assertIsNotNone(row["completed_at"], where)
            mine = [
                p for p in payloads if p["event_type"] == "host" and p["host_id"] == host.host_id
            ]
            seqs = [p["seq"] for p in mine if p["seq"] is not None]
            self.assertEqual(seqs, sorted(seqs), f"{where}: seq went backwards")
            ends = [p for p in mine if p["status"] in DB_TERMINAL]
            self.assertEqual(len(ends), 1, f"{where}: terminal notifications {ends}")
            self.assertIs(mine[-1], ends[0], f"{where}: notified after its end")
            self.assertEqual(ends[0]["status"], row["status"], where)
            agent_seq = detail.get("seq")
            print(f"  {self.id().rsplit('.', 1)[-1]} host {host.host_id[:8]}: agent "
                  f"{detail['status']}/{detail.get('error_code')} seq {agent_seq}; row "
                  f"{row['status']} seq {row['relay_last_seq']} via {row['relay_transport']}; "
                  f"{len(mine)} host notifications")
            if isinstance(agent_seq, int) and row["relay_last_seq"] > agent_seq:
                self.assertIn(f"lost or renumbered events of job {host.agent_job}", relay_log,
                              where)
        jobs = [p for p in payloads if p["event_type"] == "job"]
        self.assertEqual(len(jobs), 1, f"job-level notifications {jobs} {self.note()}")
        self.assertEqual(jobs[0]["status"], self.seeder.job_status(job_id))
        self.assertEqual(jobs[0]["status"], rollup_status(statuses))
        self.assertEqual(jobs[0]["host_count"], len(hosts))
        for daemon in [*self.agents, self.relay]:
            if daemon is not None:
                assert_no_unhandled(*daemon_logs(daemon))
        return details


class AgentFaultTests(FaultTestCase):
    async def test_agent_kill_9_at_random_moments(self) -> None:
        """kill -9 of four agents: the job's first second, the run's first, a middle, the last.
        The package runs outlive their agents: each restarted agent follows its run again, so
        the three killed during the run end completed, their stand-in never signalled."""
        run = 6.0
        agents = await self.start_agents(4, download_seconds=1.0, dpkg_seconds=run - 1.0)
        await self.start_relay()
        job_id, hosts = await self.dispatch(agents)
        moments = [
            ("in the job's first second, before the package run", None),
            ("in the package run's first second", self.random.uniform(0.0, 1.0)),
            ("in the middle", self.random.uniform(1.0, run - 1.0)),
            ("in the job's last second", self.random.uniform(run - 1.0, run)),
        ]
        down = [self.random.uniform(0.5, 3.0) for _ in hosts]

        async def kill(host: Host, offset: float | None, wait: float) -> None:
            if offset is None:
                await sleep(self.random.uniform(0.0, 0.3))
            else:
                await sleep_until(await self.package_run_started(host) + offset)
            host.agent.kill()
            await sleep(wait)
            await host.agent.restart(timeout=60)

        kills = [(what, offset, wait) for (what, offset), wait in zip(moments, down, strict=True)]
        print("agent kills:", kills)
        await run_all(*(kill(h, m[1], w) for h, m, w in zip(hosts, moments, down, strict=True)))
        await self.settle(job_id, hosts)
        details = await self.check(job_id, hosts)
        completed = [d for d in details.values() if d["status"] == "completed"]
        self.assertGreaterEqual(len(completed), 3, f"{details} {self.note()}")
        for host in hosts:
            signals = [e for e in host.agent.record() if e.get("event") == "signal"]
            self.assertEqual(signals, [], f"{host.host_id[:8]} {self.note()}")

    async def test_graceful_agent_restart(self) -> None:
        """SIGTERM of the agent mid-run, three times: it finishes the run, the row follows it."""
        run = 6.0
        agents = await self.start_agents(3, download_seconds=1.0, dpkg_seconds=run - 1.0)
        await self.start_relay()
        job_id, hosts = await self.dispatch(agents)

        async def restart(host: Host) -> None:
            await sleep_until(
                await self.package_run_started(host) + self.random.uniform(0.5, run - 0.5)
            )
            await host.agent.stop()
            await host.agent.restart(timeout=60)

        await run_all(*(restart(h) for h in hosts))
        await self.settle(job_id, hosts)
        await self.check(job_id, hosts)

    async def test_agent_whose_disk_lost_its_last_writes(self) -> None:
        """The host goes down (the agent and its package run killed) and the journal's last
        records are gone: the agent ends the job numbered below the relay."""
        run = 6.0
        agents = await self.start_agents(3, download_seconds=1.0, dpkg_seconds=run - 1.0)
        await self.start_relay()
        job_id, hosts = await self.dispatch(agents)

        async def lose_writes(host: Host) -> None:
            await sleep_until(
                await self.package_run_started(host) + self.random.uniform(2.0, run - 1.0)
            )
            host.agent.kill()
            kill_runs(host.agent.state_dir)  # a power loss takes the package run with it
            cut = drop_journal_tail(host.agent.state_dir, LOST_RECORDS)
            print(f"  {host.host_id[:8]}: {cut} journal records lost")
            await host.agent.restart(timeout=60)

        await run_all(*(lose_writes(h) for h in hosts))
        await self.settle(job_id, hosts)
        details = await self.check(job_id, hosts)
        behind = [h for h in hosts
                  if self.seeder.row(h.row_id)["relay_last_seq"] > details[h.host_id]["seq"]]
        self.assertTrue(behind, f"no agent numbered below the relay {self.note()}")
        assert self.relay is not None
        self.assertIn("lost or renumbered events", self.relay.log_text())

    async def test_agent_that_lost_its_history(self) -> None:
        """Agents that no longer know the job: failed after the deadline, across a relay kill."""
        deadline = 10.0
        agents = await self.start_agents(3, download_seconds=1.0, dpkg_seconds=4.0)
        relay = await self.start_relay(ws_relay_unreachable_deadline_secs=deadline)
        job_id, hosts = await self.dispatch(agents)

        async def forget(host: Host) -> None:
            await sleep_until(
                await self.package_run_started(host) + self.random.uniform(0.0, 3.0)
            )
            host.agent.kill()
            shutil.rmtree(host.agent.state_dir)
            await host.agent.restart(timeout=60)

        await run_all(*(forget(h) for h in hosts))

        def first_missing() -> list[Any]:
            return [self.seeder.one("SELECT relay_missing_since FROM patch_job_hosts "
                                    "WHERE id = %s", (h.row_id,))[0] for h in hosts]

        await wait_until(lambda: None not in first_missing(), "JOB_NOT_FOUND to be recorded", 30)
        since = {h.row_id: t.timestamp() for h, t in zip(hosts, first_missing(), strict=True)}
        self.assertEqual({self.seeder.row(h.row_id)["status"] for h in hosts}, {"running"})
        # a relay restart within the deadline must not start the count again
        await sleep_until(max(since.values()) + 3.0)
        relay.kill()
        await relay.start(timeout=60)
        restarted = time.time()
        await self.settle(job_id, hosts)
        for host in hosts:
            row = self.seeder.row(host.row_id)
            self.assertEqual(row["status"], "failed")
            self.assertIn("JOB_NOT_FOUND", row["error_message"])
            self.assertIn(f"agent localhost:{host.agent.port}", row["error_message"])
            ended = row["completed_at"].timestamp()
            self.assertGreater(ended - since[host.row_id], deadline - 0.5, "ended before")
            self.assertLess(ended, restarted + deadline - 1.0, "counted from the restart")
        details = await self.check(job_id, hosts)
        self.assertEqual({d.get("code") for d in details.values()}, {404})


class RelayFaultTests(FaultTestCase):
    async def moments_after_start(
        self, hosts: Sequence[Host], windows: Sequence[tuple[float, float]]
    ) -> list[float]:
        """Wall-clock moments, one per window of seconds after the first package run started."""
        started = min([await self.package_run_started(h) for h in hosts])
        return [started + self.random.uniform(low, high) for low, high in windows]

    async def test_relay_kill_9_three_times(self) -> None:
        """kill -9 of the relay three times during the run; it resumes from the rows' seq."""
        agents = await self.start_agents(3, download_seconds=1.0, dpkg_seconds=11.0)
        relay = await self.start_relay()
        job_id, hosts = await self.dispatch(agents)
        for when in await self.moments_after_start(hosts, [(1, 3), (4, 6), (7, 9)]):
            await sleep_until(when)
            relay.kill()
            await sleep(self.random.uniform(0.2, 1.5))
            await relay.start(timeout=60)
        await self.settle(job_id, hosts)
        await self.check(job_id, hosts)
        self.assertEqual(relay.starts, 4)

    async def test_postgresql_restart_three_times(self) -> None:
        """PostgreSQL restarted three times during the run: nothing lost, nothing twice."""
        role = f"lpa_relay_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.seeder.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
        server = pg.cluster()

        def drop_role() -> None:
            if server.running:
                self.seeder.execute(f"DROP ROLE IF EXISTS {role}")

        self.addCleanup(drop_role)  # runs after the relay's cleanup (registered later)
        relay_dsn = self.dsn.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
        self.assertNotEqual(relay_dsn, self.dsn)
        agents = await self.start_agents(3, download_seconds=1.0, dpkg_seconds=11.0)
        await self.start_relay(relay_dsn)
        job_id, hosts = await self.dispatch(agents)
        for when in await self.moments_after_start(hosts, [(1, 2), (4, 5), (7, 8)]):
            await sleep_until(when)
            await self.restart_postgresql(role)
        await self.settle(job_id, hosts)
        await self.check(job_id, hosts)

    async def restart_postgresql(self, role: str) -> None:
        """Stop and start the cluster; the relay (as ``role``) logs in only after the listener.

        The relay may log in again only once the LISTEN session is back, so that no
        notification can be committed while nobody listens.
        """
        server = pg.cluster()
        self.seeder.execute(f"ALTER ROLE {role} NOLOGIN")
        self.seeder.close()
        server.stop()
        await sleep(self.random.uniform(0.5, 2.0))
        server.start()
        self.seeder = Seeder(self.dsn)
        self.listener.connect()
        self.seeder.execute(f"ALTER ROLE {role} LOGIN")


class RelayLogUnderOutageTests(FaultTestCase):
    """The store logs a database outage as its own lines, never as an Unhandled Error."""

    async def test_postgresql_restart_leaves_no_unhandled_error(self) -> None:
        """A PostgreSQL restart under a following relay leaves no Unhandled Error in its log."""
        agents = await self.start_agents(1, download_seconds=1.0, dpkg_seconds=3.0)
        await self.start_relay()
        job_id, hosts = await self.dispatch(agents)
        await sleep_until(await self.package_run_started(hosts[0]) + 1.0)
        self.seeder.close()
        pg.cluster().restart()
        self.seeder = Seeder(self.dsn)
        await self.settle(job_id, hosts)
        assert self.relay is not None
        await self.relay.stop()
        assert_no_unhandled(*daemon_logs(self.relay))


class NetworkFaultTests(FaultTestCase):
    async def test_blackhole_of_30_seconds(self) -> None:
        """30 s in which every byte between relay and agent is dropped, at three moments."""
        run = 20.0
        agents = await self.start_agents(3, download_seconds=2.0, dpkg_seconds=run - 2.0)
        proxies = [BlackholeProxy(agent.port) for agent in agents]
        for proxy in proxies:
            await proxy.listen()
            self.addCleanup(proxy.close)
        await self.start_relay(ws_relay_handshake_timeout_secs=3)
        job_id, hosts = await self.dispatch(agents, proxies)

        async def blackhole(host: Host, low: float, high: float) -> None:
            assert host.proxy is not None
            await sleep_until(await self.package_run_started(host) + self.random.uniform(low, high))
            host.proxy.blackhole()
            await sleep(30.0)
            # the run (20 s) ended inside the blackhole: the relay cannot have seen its end
            self.assertEqual(self.seeder.row(host.row_id)["status"], "running", self.note())
            accepted = host.proxy.accepted
            host.proxy.restore()
            await wait_until(lambda: host.proxy.accepted > accepted, "the relay to reconnect", 30)

        await run_all(*(blackhole(h, 1 + 4 * n, 3 + 4 * n) for n, h in enumerate(hosts)))
        await self.settle(job_id, hosts)
        await self.check(job_id, hosts)
