"""A real agent process killed with SIGKILL mid-job: no seq is ever numbered twice.

One ``twistd lpa-agent`` (tests.agentproc: private mount namespace, stand-in apt-get) runs three
real (non-dry-run) patch jobs of ~5 s of output each.  A follower reads each job's events from
``GET /api/v1/jobs/{id}/events?after=N`` as they come; the agent is killed with SIGKILL right
after the job's first event, at a random moment, and near the job's end, then restarted on the
same port and state directory.  After each restart:

* every event seen before the kill is served again, identical, by ``events?after=0``;
* the job ends (``failed``/``AGENT_RESTARTED``, the stand-in died with the agent's pipe) with a
  terminal ``job_status`` numbered above everything seen, then exactly one ``job_complete``;
* the agent's incarnation changed, and the stand-in record shows one mutating run per job.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests import standin
from tests.agentproc import AgentProcess, wait_until
from tests.certs import make_test_pki
from tests.logcheck import assert_no_unhandled

DOWNLOAD_SECONDS = 2.0
DPKG_SECONDS = 3.0
INTERVAL = 0.05
DPKG_LINES = int(DPKG_SECONDS / INTERVAL)


class Follower:
    """Polls a job's events endpoint, keeping every event seen (by seq) and the answers."""

    def __init__(self, agent: AgentProcess, job_id: str) -> None:
        self.agent = agent
        self.job_id = job_id
        self.seen: dict[int, dict[str, Any]] = {}
        self.incarnation: str | None = None

    @property
    def last(self) -> int:
        return max(self.seen, default=0)

    async def poll(self) -> None:
        code, body = await self.agent.request(
            "GET", f"/api/v1/jobs/{self.job_id}/events?after={self.last}"
        )
        if code != 200:
            raise AssertionError(f"events answered {code}: {body}")
        self.incarnation = body["data"]["incarnation"]
        for event in body["data"]["events"]:
            previous = self.seen.setdefault(event["seq"], event)
            if previous != event:
                raise AssertionError(f"seq {event['seq']} served twice, differently")

    async def follow_until(self, done: Callable[["Follower"], bool], timeout: float) -> None:
        deadline = reactor.seconds() + timeout
        while not done(self):
            if reactor.seconds() > deadline:
                raise AssertionError(f"job {self.job_id}: gave up waiting (seen {self.last})")
            await self.poll()
            await deferLater(reactor, 0.02, lambda: None)


def first_event(follower: Follower) -> bool:
    return follower.last >= 1


def dpkg_line_at_least(line: int) -> Callable[[Follower], bool]:
    marker = f" of {DPKG_LINES}]"

    def reached(follower: Follower) -> bool:
        for event in follower.seen.values():
            message = event["message"]
            if marker in message and "[line " in message:
                if int(message.split("[line ", 1)[1].split(" ", 1)[0]) >= line:
                    return True
        return any(e["event"] == "job_complete" for e in follower.seen.values())

    return reached


class KillNineTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-crash-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))
        self.seed = random.randrange(1 << 30)
        self.random = random.Random(self.seed)

    async def test_sigkill_never_renumbers_events(self) -> None:
        """kill -9 after the first event, at a random moment and near the end: every event
        seen survives unchanged, the job ends above it with one job_complete, no run twice."""
        agent = AgentProcess(
            os.path.join(self.tmp, "agent"), self.pki,
            extra_yaml="rate_limit:\n  enabled: false\n",
            download_seconds=DOWNLOAD_SECONDS, dpkg_seconds=DPKG_SECONDS, interval=INTERVAL,
        )
        self.addCleanup(agent.cleanup)
        await agent.start()
        moments: list[tuple[str, Callable[[Follower], bool]]] = [
            ("right after the first event", first_event),
            ("at a random moment", self._random_moment()),
            ("near the end", dpkg_line_at_least(DPKG_LINES - 3)),
        ]
        windows = []
        for number, (when, moment) in enumerate(moments, 1):
            windows.append(await self._kill_during_a_job(agent, number, when, moment))
        # every mutating run started while its own job ran, at most one per job: none was
        # started again by a restarted agent
        starts = [
            r["time"] for r in agent.record()
            if r.get("event") == "start" and r["argv"] in standin.mutating_calls([r])
        ]
        # a run's own "start" record can come a moment after its agent was killed (the
        # stand-in starts slower than the kill), so each job owns the time up to the next
        # job's start; a run started again by a restarted agent would still count twice
        owned = [(begin, windows[i + 1][0] if i + 1 < len(windows) else float("inf"))
                 for i, (begin, _end) in enumerate(windows)]
        per_job = [sum(1 for t in starts if begin <= t < end) for begin, end in owned]
        self.assertEqual(sum(per_job), len(starts), (starts, windows, self.seed))
        self.assertLessEqual(max(per_job), 1, (per_job, self.seed))
        self.assertGreaterEqual(sum(per_job), 1, (per_job, self.seed))
        assert_no_unhandled(agent.log_path)

    def _random_moment(self) -> Callable[[Follower], bool]:
        total = int(DOWNLOAD_SECONDS / INTERVAL) + DPKG_LINES
        target = self.random.randrange(5, total)
        return lambda follower: follower.last >= target

    async def _kill_during_a_job(
        self, agent: AgentProcess, number: int, when: str, moment: Callable[[Follower], bool]
    ) -> tuple[float, float]:
        """One job killed at ``moment``; return the wall-clock window it ran in."""
        why = f"job {number}, killed {when} (seed {self.seed})"
        submitted = time.time()
        code, body = await agent.request("POST", "/api/v1/patches/apply", json={})
        self.assertEqual(code, 202, body)
        follower = Follower(agent, body["data"]["job_id"])
        await follower.follow_until(moment, timeout=60)
        agent.kill()
        killed = time.time()
        seen = dict(follower.seen)
        before = follower.incarnation
        await agent.restart()

        async def ended() -> bool:
            await follower.poll()
            return any(e["event"] == "job_complete" for e in follower.seen.values())

        await wait_until(ended, f"{why}: the job to end after the restart", timeout=60)
        code, body = await agent.request(
            "GET", f"/api/v1/jobs/{follower.job_id}/events?after=0"
        )
        self.assertEqual(code, 200, body)
        events = body["data"]["events"]
        served = {e["seq"]: e for e in events}
        for seq, event in seen.items():
            self.assertEqual(served.get(seq), event, f"{why}: seq {seq} changed")
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)), why)
        terminal, complete = events[-2], events[-1]
        self.assertEqual(complete["event"], "job_complete", why)
        self.assertEqual([e["event"] for e in events].count("job_complete"), 1, why)
        self.assertGreater(terminal["seq"], max(seen), why)
        if any(e["event"] == "job_complete" for e in seen.values()):
            self.assertEqual(terminal["status"], "completed", why)  # it ended before the kill
        else:
            self.assertEqual(
                (terminal["status"], terminal["error_code"]), ("failed", "AGENT_RESTARTED"), why
            )
        self.assertNotEqual(body["data"]["incarnation"], before, why)
        self.assertEqual(terminal["incarnation"], body["data"]["incarnation"], why)
        code, detail = await agent.request("GET", f"/api/v1/jobs/{follower.job_id}")
        self.assertEqual(detail["data"]["seq"], complete["seq"], why)
        self.assertEqual(detail["data"]["status"], terminal["status"], why)
        return submitted, killed
