"""Three real relay processes share 30 agents through one PostgreSQL; one is killed with
SIGKILL mid-job and a fourth joins.

The relays are ``twistd -n lpa-relay --config relay-N.toml`` processes; the agents are
:class:`~tests.fakeagents.LpaTestAgent` instances in this process, each on its own loopback port
over mutual TLS, each running one agent job of one of three patch jobs.  A LISTEN session in
this process timestamps every ``job_update`` notification, and every event's emission is
timestamped too (one monotonic clock for all processes on Linux).  The test pins:

* after settling, every agent has exactly one WebSocket (one relay follows it) and each relay
  holds exactly its share (10 of 30);
* a relay killed with SIGKILL mid-job loses its agents to the two others, which then hold 15
  each; a fourth relay then takes a share (10 each);
* every row ends ``succeeded`` with every output line once, in order; every event reaches a
  host notification within 30 s; exactly one job-level notification per patch job.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase

from lpa import events as ev
from lpa.relay.status import fleet_status
from tests import pg
from tests.certs import make_test_pki
from tests.fakeagents import LpaTestAgent
from tests.pgutil import Seeder
from tests.system import CHECKOUT as ROOT

AGENTS = 30
JOBS = 3


async def until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await deferLater(reactor, 0.1, lambda: None)


class NotificationLog:
    """A LISTEN session polled from the reactor; each payload with its arrival time."""

    def __init__(self, dsn: str) -> None:
        self.connection = psycopg2.connect(dsn)
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            cursor.execute("LISTEN job_update")
        self.received: list[tuple[float, dict[str, Any]]] = []
        self._loop = LoopingCall(self._poll)
        self._loop.start(0.02)

    def _poll(self) -> None:
        import json

        self.connection.poll()
        now = time.monotonic()
        while self.connection.notifies:
            note = self.connection.notifies.pop(0)
            self.received.append((now, json.loads(note.payload)))

    def close(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self.connection.close()


class RelayFleetTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-relay-fleet-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))
        self.dsn = pg.database(self, migrated=True)
        self.seed = Seeder(self.dsn)
        self.addCleanup(self.seed.close)
        self.relays: dict[str, subprocess.Popen[bytes]] = {}
        self.addCleanup(self.stop_relays)

    # -- relays ------------------------------------------------------------------------------

    def start_relay(self, relay_id: str) -> None:
        config = os.path.join(self.tmp, f"{relay_id}.toml")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(
                f'[database]\nurl = "{self.dsn}"\n\n'
                "[worker]\nws_relay_scan_interval_secs = 0.5\nws_relay_poll_interval_secs = 1\n"
                "ws_relay_reconnect_initial_delay_secs = 0.2\n"
                "ws_relay_reconnect_max_delay_secs = 1\n"
                f'ws_relay_id = "{relay_id}"\n'
                "ws_relay_heartbeat_interval_secs = 0.5\nws_relay_lease_ttl_secs = 2\n\n"
                f'[security]\nagent_client_cert_path = "{self.pki.good.cert}"\n'
                f'agent_client_key_path = "{self.pki.good.key}"\n'
                f'ca_cert_path = "{self.pki.ca_cert}"\n\n'
                '[logging]\nformat = "text"\n\n'
                "[ops]\nenabled = false\n"  # relays side by side: no port to fight over
            )
        env = dict(os.environ)
        for name in list(env):
            if name.startswith("PATCH_MANAGER"):
                del env[name]
        env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", f"--logfile={self.log_path(relay_id)}",
            "lpa-relay", "--config", config,
        ]
        self.relays[relay_id] = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def log_path(self, relay_id: str) -> str:
        return os.path.join(self.tmp, f"{relay_id}.log")

    def log(self, relay_id: str) -> str:
        try:
            with open(self.log_path(relay_id), encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def stop_relays(self) -> None:
        for process in self.relays.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.relays.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def shares(self) -> dict[str, int]:
        """Agents followed per live relay, from the database."""
        return {r.relay_id: r.agents for r in fleet_status(self.dsn).relays if r.live}

    # -- agents ------------------------------------------------------------------------------

    def start_agents(self) -> list[tuple[LpaTestAgent, str, str]]:
        """AGENTS agents, each with one running agent job of one of JOBS patch jobs."""
        jobs = [self.seed.job("running") for _ in range(JOBS)]
        made = []
        for n in range(AGENTS):
            agent = LpaTestAgent(reactor, max_events_per_job=100_000)
            agent.listen(self.pki.server_options(crl_path=None))
            self.addCleanup(agent.kill)
            agent_job = agent.add_job()
            agent.emit(agent_job, ev.RUNNING, "Job started")
            host = self.seed.host("localhost", f"192.0.2.{n + 1}", agent.port_number)
            row = self.seed.host_job(jobs[n % JOBS], host, agent_job).row_id
            made.append((agent, agent_job, row))
        self.jobs = jobs
        return made

    def open_sockets(self, agents: list[tuple[LpaTestAgent, str, str]]) -> list[int]:
        return [len(agent.sockets) for agent, _, _ in agents]

    async def settled(
        self, agents: list[tuple[LpaTestAgent, str, str]], live: set[str], what: str
    ) -> dict[str, int]:
        """Every agent streamed by exactly one relay, the live relays' shares summing to all."""
        share = math.ceil(AGENTS / len(live))

        def done() -> bool:
            shares = self.shares()
            return (
                set(shares) == live
                and sum(shares.values()) == AGENTS
                and max(shares.values()) <= share
                and all(
                    len(agent.sockets) == 1 and job in agent.sockets[0].subscribed
                    for agent, job, _ in agents
                )
            )

        try:
            await until(done, what, timeout=90)
        except AssertionError:
            raise AssertionError(
                f"{what}: shares {self.shares()}, sockets {self.open_sockets(agents)}; "
                + " | ".join(f"{rid}: {self.log(rid)[-1500:]}" for rid in self.relays)
            ) from None
        return self.shares()

    # -- the test ------------------------------------------------------------------------------

    async def test_three_relays_share_fail_over_and_take_in_a_fourth(self) -> None:
        """Balanced, exactly one relay per agent; kill -9 mid-job and a new relay: nothing lost,
        nothing doubled, one job-level notification per job, no event waits 30 s."""
        listener = NotificationLog(self.dsn)
        self.addCleanup(listener.close)
        agents = self.start_agents()
        for relay_id in ("relay-1", "relay-2", "relay-3"):
            self.start_relay(relay_id)
        shares = await self.settled(agents, {"relay-1", "relay-2", "relay-3"}, "three relays")
        self.assertEqual(sorted(shares.values()), [10, 10, 10])

        emitted: dict[tuple[str, int], float] = {}
        lines: dict[str, list[str]] = {job: [] for _, job, _ in agents}

        def emit_all() -> None:
            for agent, job, _ in agents:
                text = f"line {len(lines[job])}"
                event = agent.emit(job, ev.RUNNING, text, kind=ev.KIND_OUTPUT)
                lines[job].append(text)
                assert event.seq is not None  # the agent numbers what it emits
                emitted[(job, event.seq)] = time.monotonic()

        producer = LoopingCall(emit_all)
        producer.start(0.25)
        self.addCleanup(lambda: producer.stop() if producer.running else None)
        await deferLater(reactor, 2.0, lambda: None)  # events flow through three relays

        victim = self.relays["relay-2"]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed_at = time.monotonic()
        shares = await self.settled(agents, {"relay-1", "relay-3"}, "failover to two relays")
        failover = time.monotonic() - killed_at
        self.assertEqual(sorted(shares.values()), [15, 15])
        self.assertLess(failover, 2 * 2.0 + 5)  # two lease TTLs, plus handshakes on a busy box

        self.start_relay("relay-4")
        shares = await self.settled(agents, {"relay-1", "relay-3", "relay-4"}, "a fourth relay")
        self.assertEqual(sorted(shares.values()), [10, 10, 10])

        producer.stop()
        for agent, job, _ in agents:
            agent.finish(job)  # the terminal job_status, then job_complete (not a row change)
            emitted[(job, agent.events.last_seq(job) - 1)] = time.monotonic()
        await until(
            lambda: all(self.seed.job_status(job) == "succeeded" for job in self.jobs),
            "every patch job succeeded",
            timeout=90,
        )
        await until(
            lambda: len([p for _, p in listener.received if p["event_type"] == "job"]) >= JOBS,
            "job-level notifications",
            timeout=10,
        )
        await deferLater(reactor, 0.5, lambda: None)  # let late duplicates, if any, arrive

        for agent, job, row in agents:
            state = self.seed.row(row)
            self.assertEqual(state["status"], "succeeded")
            self.assertEqual(state["output"], "\n".join(lines[job]))  # each line once, in order
            self.assertEqual(state["relay_last_seq"], agent.events.last_seq(job) - 1)

        host_notes: dict[str, list[tuple[float, int]]] = {}
        for received, payload in listener.received:
            if payload["event_type"] == "host":
                host_notes.setdefault(payload["agent_job_id"], []).append(
                    (received, payload["seq"])
                )
        worst = 0.0
        for (job, seq), at in emitted.items():
            arrivals = [when for when, notified in host_notes.get(job, []) if notified >= seq]
            self.assertTrue(arrivals, f"event {seq} of {job} never reached a notification")
            worst = max(worst, min(arrivals) - at)
        self.assertLess(worst, 30.0)
        job_notes = [p for _, p in listener.received if p["event_type"] == "job"]
        self.assertEqual(sorted(p["job_id"] for p in job_notes), sorted(self.jobs))
        for relay_id in ("relay-1", "relay-3", "relay-4"):
            self.assertNotIn("Unhandled Error", self.log(relay_id))
            self.assertNotIn("Traceback", self.log(relay_id))
